"""service.settings: LCS_* environment variables, parsed once and refused at start-up when bad."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, redact_url, settings_errors, unknown_variables
from tests.service.service_support import TinyCheckpoint


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint) -> None:
    monkeypatch.setenv("LCS_CHECKPOINT", str(structured.path))
    monkeypatch.setenv("LCS_ALPHA_GRID", "1, 0.5 0")
    monkeypatch.setenv("LCS_PREBUILD", "1")
    monkeypatch.setenv("LCS_PROFILE_BATCHES", "1,4 16")
    monkeypatch.setenv("LCS_MAX_BATCH", "16")
    monkeypatch.setenv("LCS_API_KEY", "s3cret")
    s = Settings()
    assert s.checkpoint == structured.path
    assert s.alpha_grid == [0.0, 0.5, 1.0]  # sorted
    assert s.prebuild == [1.0]
    assert s.profile_batches == [1, 4, 16]
    assert s.max_batch == 16
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


@pytest.mark.parametrize("value", ["", "all", "checkpoint"])
def test_grid_defaults_to_the_checkpoint(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, value: str
) -> None:
    monkeypatch.setenv("LCS_ALPHA_GRID", value)
    assert Settings(checkpoint=structured.path).alpha_grid is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LCS_ALPHA_GRID", "0 1.5", "alphas must be in [0, 1]"),
        ("LCS_PREBUILD", "-0.1", "alphas must be in [0, 1]"),
        ("LCS_ALPHA_GRID", "0,0.5,0.5000001", "0.5 and 0.5000001 are one alpha spelt twice (closer than 1e-06)"),
        ("LCS_MAX_BATCH", "0", "greater than or equal to 1"),
        ("LCS_PORT", "70000", "less than or equal to 65535"),
        ("LCS_CHANNELS_LAST", "maybe", "auto"),
        ("LCS_MAX_BODY_BYTES", "10", "greater than or equal to 1024"),
        ("LCS_SLO_P99_SECONDS", "0", "greater than 0"),
        # infinite durations passed every bound, then failed in use (/predict 500, a start-up traceback)
        ("LCS_CONTROL_INTERVAL_SECONDS", "inf", "Input should be a finite number"),
        ("LCS_DRAIN_SECONDS", "1e400", "Input should be a finite number"),
        ("LCS_PROMETHEUS_WINDOW_SECONDS", "Infinity", "Input should be a finite number"),
        ("LCS_LOG_LEVEL", "loud", "debug"),
        # lists say what they are made of, with an example
        ("LCS_ALPHA_GRID", "abc", "cannot read 'abc'; expected comma-separated alphas in [0, 1], e.g. 0,0.25,0.5"),
        ("LCS_PREBUILD", "0.5;1", "cannot read '0.5;1'; expected comma-separated alphas"),
        ("LCS_PROFILE_BATCHES", "x", "cannot read 'x'; expected comma-separated whole numbers (batch sizes), e.g. 1,8"),
        ("LCS_PROFILE_BATCHES", "1,2.5", "cannot read '2.5'; expected comma-separated whole numbers"),
        ("LCS_PROFILE_BATCHES", "0,8", "batch sizes must be at least 1; got [0]"),
        ("LCS_PROFILE_BATCHES", " ", "no batch sizes; give some, e.g. 1,8,32, or unset it for the default"),
    ],
)
def test_bad_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(checkpoint=structured.path)


def test_profiled_batch_sizes_stop_at_the_largest_batch(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint
) -> None:
    """A batch size above any batch the service runs was profiled (at start-up, on a probe that large);
    asked for, it is refused, and the default's sizes stop at LCS_MAX_BATCH. One request of up to
    LCS_MAX_INPUTS images runs as a batch of its own, so sizes up to that may be profiled."""
    monkeypatch.setenv("LCS_MAX_BATCH", "8")
    monkeypatch.setenv("LCS_MAX_INPUTS", "16")
    monkeypatch.setenv("LCS_PROFILE_BATCHES", "1,32")
    with pytest.raises(ValidationError, match=re.escape("batch sizes [32] are larger than any batch the service")):
        Settings(checkpoint=structured.path)
    monkeypatch.setenv("LCS_PROFILE_BATCHES", "1,8,16")
    assert Settings(checkpoint=structured.path).profile_batches == [1, 8, 16]
    monkeypatch.delenv("LCS_PROFILE_BATCHES")
    monkeypatch.delenv("LCS_MAX_INPUTS")
    defaults = {}
    for largest in ["1", "8", "16", "32", "64"]:
        monkeypatch.setenv("LCS_MAX_BATCH", largest)
        defaults[largest] = Settings(checkpoint=structured.path).profile_batches
    assert defaults == {"1": [1], "8": [1, 8], "16": [1, 8, 16], "32": [1, 8, 32], "64": [1, 8, 32]}


@pytest.mark.parametrize("name", ["a/b", ".", "..", " lead", "trail ", "tab\there"])
def test_a_model_name_no_v2_path_can_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, name: str
) -> None:
    monkeypatch.setenv("LCS_MODEL_NAME", name)
    with pytest.raises(ValidationError, match=re.escape("not a usable model name: use no '/', control characters")):
        Settings(checkpoint=structured.path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("fashion-v2.1_b", "fashion-v2.1_b"), ("two words", "two words"), ("v~2", "v~2"), ("", None)],
)
def test_usable_model_names_are_kept_and_empty_means_the_default(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, name: str, expected: str | None
) -> None:
    monkeypatch.setenv("LCS_MODEL_NAME", name)
    assert Settings(checkpoint=structured.path).model_name == expected


def test_a_checkpoint_whose_file_stem_is_no_model_name_needs_one(structured: TinyCheckpoint, tmp_path: Path) -> None:
    tabbed = tmp_path / "my\tmodel.safetensors"
    tabbed.write_bytes(structured.path.read_bytes())
    with pytest.raises(ValidationError, match=r"LCS_MODEL_NAME is unset.*'my\\tmodel'.*set LCS_MODEL_NAME"):
        Settings(checkpoint=tabbed)
    assert Settings(checkpoint=tabbed, model_name="mine").model_name == "mine"


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_the_default_not_every_interface(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, host: str
) -> None:
    """`LCS_HOST=` (an env file's, or compose's `${VAR:-}`) was passed to uvicorn, which took it as 0.0.0.0 and
    ::, serving on every interface."""
    monkeypatch.setenv("LCS_HOST", host)
    assert Settings(checkpoint=structured.path).host == "127.0.0.1"


@pytest.mark.parametrize(("value", "expected"), [("", None), ("1048576", 2**20), ("  ", None)])
def test_the_bodies_bound_is_read_and_empty_means_its_default(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, value: str, expected: int | None
) -> None:
    monkeypatch.setenv("LCS_BODIES_MAX_BYTES", value)
    from service.cgroups import default_bodies_max_bytes

    got = Settings(checkpoint=structured.path).bodies_max_bytes
    assert got == (default_bodies_max_bytes() if expected is None else expected)


def test_a_bodies_bound_under_1_kib_is_refused(monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint) -> None:
    monkeypatch.setenv("LCS_BODIES_MAX_BYTES", "10")
    with pytest.raises(ValidationError, match="bodies_max_bytes"):
        Settings(checkpoint=structured.path)


@pytest.mark.parametrize(
    ("selector", "kept"),
    [
        ('job="lcs"', 'job="lcs"'),
        (' job="lcs", namespace!~"dev|test", ', 'job="lcs", namespace!~"dev|test",'),
        ("env='prod',x=`raw`", "env='prod',x=`raw`"),
        ('"service.name"="lcs"', '"service.name"="lcs"'),  # Prometheus 3's quoted label names
        ('v="a\\"b\\u00e9",r=~"\\\\d+\\\\pL"', 'v="a\\"b\\u00e9",r=~"\\\\d+\\\\pL"'),  # Go's escapes; RE2's \pL
        ("r=~\"lcs|(?i)LCS2\",s='it\\'s'", "r=~\"lcs|(?i)LCS2\",s='it\\'s'"),  # a flag mid-pattern: RE2 takes it
        ("", ""),
    ],
)
def test_prometheus_selectors_that_are_kept(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, selector: str, kept: str
) -> None:
    monkeypatch.setenv("LCS_PROMETHEUS_SELECTOR", selector)
    assert Settings(checkpoint=structured.path).prometheus_selector == kept


@pytest.mark.parametrize(
    ("selector", "problem"),
    [
        ("job=lcs", "not PromQL label matchers: expected"),
        ('{job="lcs"}', "not PromQL label matchers (without the braces)"),
        ('job="lcs" env="prod"', "not PromQL label matchers"),
        ('job=="lcs"', "not PromQL label matchers"),
        ("job", "not PromQL label matchers"),
        ('job="\\q"', "not PromQL label matchers"),  # an escape Go does not know
        ('job="a\nb"', "not PromQL label matchers"),  # a line break inside the quotes
        ('a="b",\xa0c="d"', "not PromQL label matchers"),  # a no-break space, which PromQL's lexer refuses
        ('job=~"("', '"(" is not a regular expression'),
        ('job=~"\\U00110000"', "an escape of a code point Unicode does not have"),  # was a SyntaxError
        ('job="\\ud800"', "an escape of a code point Unicode does not have"),
        ('job="\\777"', "not PromQL label matchers"),  # octal past 255
        ('job="it\\\'s"', "not PromQL label matchers"),  # each quote escapes only itself
        ('__name__="lcs_requests_total"', "__name__ is the metric's name"),
    ],
)
def test_a_prometheus_selector_promql_cannot_parse_is_refused(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, selector: str, problem: str
) -> None:
    """It started, and every fleet query was a 400, logged as Prometheus not answering, with no word of the
    setting; the controller ran on local signals."""
    monkeypatch.setenv("LCS_PROMETHEUS_SELECTOR", selector)
    with pytest.raises(ValidationError, match=re.escape(problem)):
        Settings(checkpoint=structured.path)


@pytest.mark.parametrize(
    "url", ["notaurl", "prometheus:9090", "ftp://prometheus", "http://", "http://:9090", "http://h:x"]
)
def test_a_prometheus_url_that_is_not_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, url: str
) -> None:
    """It started, and every query failed (logged at debug level): the controller ran on local signals."""
    monkeypatch.setenv("LCS_PROMETHEUS_URL", url)
    with pytest.raises(ValidationError, match=re.escape("expected an http(s) URL with a host, e.g. http://prometheus")):
        Settings(checkpoint=structured.path)


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://prometheus:9090", "http://prometheus:9090"),
        ("https://p.example/prom/ ", "https://p.example/prom/"),
        (" ", None),
    ],
)
def test_prometheus_urls_that_are_kept(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, url: str, kept: str | None
) -> None:
    monkeypatch.setenv("LCS_PROMETHEUS_URL", url)
    assert Settings(checkpoint=structured.path).prometheus_url == kept


@pytest.mark.parametrize(
    "url", ["https://admin:hunter2@prom.example.com:9O90", "ftp://admin:hunter2@prom", "admin:hunter2@[::1"]
)
def test_a_refused_prometheus_url_is_shown_without_its_password(
    monkeypatch: pytest.MonkeyPatch, structured: TinyCheckpoint, url: str
) -> None:
    """The error printed at start-up named the whole value, password included (found in review)."""
    monkeypatch.setenv("LCS_PROMETHEUS_URL", url)
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=structured.path)
    (line,) = settings_errors(e.value)
    assert line.startswith("LCS_PROMETHEUS_URL=") and "hunter2" not in line and "admin" not in line, line


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:p@prom:9090/x/y@z", "http://prom:9090/x/y@z"),  # an @ in the path is not the user's
        ("http://prom:9090", "http://prom:9090"),
        ("u:p@prom", "prom"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_missing_checkpoint_is_refused_with_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=missing)
    assert str(missing) in str(e.value) and "python -m training train" in str(e.value)


def test_a_checkpoint_path_that_cannot_be_looked_at_is_refused_with_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=tmp_path / ("x" * 300 + ".safetensors"))
    (line,) = settings_errors(e.value)
    assert line.startswith("LCS_CHECKPOINT=") and ": cannot be looked at (File name too long" in line, line


def test_a_missing_default_checkpoint_says_it_ships_with_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed from a wheel, the default (the shipped model, beside the packages) is not there: the error
    told the user the default was models/structured_line.safetensors, a path relative to nothing they knew,
    and `--help` showed it so; a wrong path set by hand names the shipped model only where there is one."""
    installed = tmp_path / "site-packages" / "models" / "structured_line.safetensors"
    monkeypatch.setattr("service.settings.DEFAULT_CHECKPOINT", installed)
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=installed)
    (line,) = settings_errors(e.value)
    assert line == (
        f"LCS_CHECKPOINT={installed}: no such file; point it at a .safetensors checkpoint written by `python -m "
        "training train` (its default, the shipped model, comes with a repository checkout, not an installed package)"
    )
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=tmp_path / "typo.safetensors")
    assert "shipped" not in str(e.value)
    monkeypatch.setattr("service.settings.DEFAULT_CHECKPOINT", Path("models/structured_line.safetensors").resolve())
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=tmp_path / "typo.safetensors")
    assert "or unset it to serve the shipped model (models/structured_line.safetensors)" in str(e.value)


def test_a_directory_as_the_checkpoint_is_said_to_be_one(tmp_path: Path) -> None:
    """It was refused as 'no such file', which sends one looking for a typo in a path that exists."""
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    (folder / "structured_line.safetensors").write_bytes(b"")
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=folder)
    assert f"LCS_CHECKPOINT={folder}: a directory, not a checkpoint file (it holds structured_line.safetensors)" in str(
        e.value
    )
    assert "no such file" not in str(e.value)


def test_unknown_lcs_variables_are_named_with_the_setting_they_are_closest_to() -> None:
    env = {
        "LCS_PROT": "9000",  # a typo: ignored, so LCS_PORT kept its default without a word
        "LCS_CHEKPOINT": "/models/x.safetensors",
        "LCS_FOO": "1",  # close to no setting
        "lcs_port": "9000",  # pydantic-settings reads names in any case: a setting
        "LCS_MAX_BATCH": "8",
        "LCS_SERVE_PORT": "tcp://10.0.0.1:8000",  # Kubernetes' service links for the Service lcs-serve
        "LCS_SERVE_SERVICE_HOST": "10.0.0.1",
        "HOME": "/root",
    }
    assert unknown_variables(env) == (
        "ignoring LCS_ variables that are not settings: LCS_CHEKPOINT (did you mean LCS_CHECKPOINT?), LCS_FOO, "
        "LCS_PROT (did you mean LCS_PORT?); `python -m service --help` lists them"
    )
    assert unknown_variables({"LCS_PORT": "1", "LCS_SERVE_PORT": "tcp://x", "PATH": "/bin"}) is None


def test_settings_are_frozen(structured: TinyCheckpoint) -> None:
    s = Settings(checkpoint=structured.path)
    with pytest.raises(ValidationError):
        s.max_batch = 4  # type: ignore[misc]


def test_the_docs_name_every_setting_and_only_real_ones() -> None:
    """The README's configuration table is kept by hand (`python -m service --help` is generated): every
    setting is in it, and no document names an LCS_ variable the service does not read."""
    root = Path(__file__).parents[2]
    settings = {"LCS_" + name.upper() for name in Settings.model_fields}
    readme = (root / "README.md").read_text()
    assert settings <= set(re.findall(r"`(LCS_[A-Z0-9_]+)`", readme)), settings - set(re.findall(r"LCS_\w+", readme))
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        unknown = set(re.findall(r"LCS_[A-Z0-9_]+", doc.read_text())) - settings
        assert not unknown, f"{doc.name} names {sorted(unknown)}, which are not service settings"
