"""`python -m service` refuses a bad checkpoint or bad settings before binding a port: exit code 2 and a
message naming the file or variable. Two real subprocesses (each imports torch, so they start together);
the other cases call the same `main()` in process."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lcs.checkpoint import CheckpointError
from service.__main__ import UvicornLines, configure_logging, main
from service.runtime import Runtime
from service.settings import Settings, settings_errors
from tests.service.service_support import TinyCheckpoint, free_port, make_settings

ROOT = Path(__file__).resolve().parents[2]


def test_bad_checkpoints_stop_start_up_with_exit_code_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file " * 40)
    missing = tmp_path / "missing.safetensors"
    cases = {missing: "no such file", garbage: "not a readable safetensors file"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    procs = {
        path: subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=ROOT,
            # a port each: the port is bound and held from before the checkpoint is read
            env={**env, "LCS_CHECKPOINT": str(path), "LCS_PORT": str(free_port())},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in cases
    }
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (path, out, err)
        assert str(path) in err, err
        assert cases[path] in err, err
        assert err.startswith("error: ") and "Traceback" not in err


def _main_with(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], **env: str) -> tuple[int, str]:
    monkeypatch.setenv("LCS_THREADS", "1")
    monkeypatch.setenv("LCS_PORT", str(free_port()))  # a case that starts the server by mistake binds no known port
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main()
    return code, capsys.readouterr().err


def test_a_pickle_is_refused_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(pickled))
    assert code == 2
    assert str(pickled) in err and "never unpickles" in err
    # the service takes no argument: the fix names the variable alone (a command-line tool's names its argument)
    assert "Point LCS_CHECKPOINT at a checkpoint written by `python -m training train`." in err
    assert "argument" not in err and len(err.strip().splitlines()) == 1


def test_an_unknown_lcs_variable_is_a_warning_not_a_refusal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logged once at start-up, which then goes on (here as far as the checkpoint, which is refused)."""
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(pickled), LCS_PROT="9000", LCS_SERVE_PORT="tcp://x")
    assert code == 2 and "never unpickles" in err  # it got as far as loading the checkpoint
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "ignoring LCS_ variables that are not settings: LCS_PROT (did you mean LCS_PORT?); "
        "`python -m service --help` lists them"
    ]


def test_an_unknown_variable_is_named_beside_the_error_it_may_explain(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT="/nonexistent/x.safetensors", LCS_CHEKPOINT="/m/x")
    assert code == 2
    first, second = err.strip().splitlines()
    assert first.startswith("warning: ignoring LCS_ variables that are not settings: LCS_CHEKPOINT (did you mean")
    assert second.startswith("error: LCS_CHECKPOINT=/nonexistent/x.safetensors: no such file")


def test_a_port_in_use_is_found_before_the_model_loads_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn found it after the whole start-up (7-8 s with a shipped model), saying only '[Errno 98]
    address already in use'. The checkpoint here is refusable: the bind error coming instead shows the
    bind was checked first."""
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(pickled), LCS_PORT=str(port))
    assert code == 2
    assert err == (
        f"error: LCS_HOST=127.0.0.1 LCS_PORT={port}: address already in use (another process listens there); "
        "stop it or change LCS_PORT\n"
    )


def test_the_port_is_held_from_the_bind_check_until_the_server_serves_on_it() -> None:
    """The check let the port go again, and a server taking it during the start-up made the service exit 3
    after its warm-up. Bound and listening, it refuses another SO_REUSEADDR socket (as uvicorn's binds)."""
    from service.__main__ import bind

    held = bind("127.0.0.1", 0)
    try:
        assert [s.getsockname()[0] for s in held] == ["127.0.0.1"]
        with socket.socket() as rival:
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="Address already in use"):
                rival.bind(held[0].getsockname())
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("999.1.1.1", "LCS_HOST=999.1.1.1: not an address or a name this machine resolves"),
        ("192.0.2.1", "LCS_HOST=192.0.2.1 LCS_PORT="),  # TEST-NET-1: an address, of no machine here
    ],
)
def test_a_host_the_server_cannot_listen_on_is_named(
    structured: TinyCheckpoint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: str,
    problem: str,
) -> None:
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(structured.path), LCS_HOST=host)
    assert code == 2
    assert err.startswith(f"error: {problem}"), err
    assert "use one of this machine's addresses, e.g. 127.0.0.1" in err and len(err.strip().splitlines()) == 1


def test_a_grid_the_checkpoint_cannot_serve_is_refused(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(structured.path), LCS_ALPHA_GRID="0.3 1")
    assert code == 2
    assert err.startswith("error: LCS_ALPHA_GRID=0.3,1: alphas [0.3] have no BatchNorm statistics in ")
    assert str(structured.path) in err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LCS_PREBUILD": "0.33"},
            "LCS_PREBUILD=0.33: alphas [0.33] are not on the served grid [0, 0.5, 1] (the grid of ",
        ),
        (
            {"LCS_ALPHA_GRID": "0,1", "LCS_PREBUILD": "0.5"},
            "LCS_PREBUILD=0.5: alphas [0.5] are not on the served grid [0, 1] (LCS_ALPHA_GRID); choose prebuilt "
            "alphas from it, or unset LCS_PREBUILD to build the whole grid",
        ),
    ],
)
def test_prebuilt_alphas_off_the_served_grid_are_refused(
    structured: TinyCheckpoint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    message: str,
) -> None:
    """They were snapped down to the grid without a word (0.33 built 0.3; on the grid 0,1, 0.5 built 0),
    while the same alphas in LCS_ALPHA_GRID were refused."""
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(structured.path), **env)
    assert code == 2
    assert err.startswith(f"error: {message}"), err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_setting_is_named(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(structured.path), LCS_MAX_BATCH="0")
    assert code == 2
    assert err.startswith("error: LCS_MAX_BATCH=0: Input should be greater than or equal to 1")


@pytest.mark.parametrize(
    ("env", "line"),
    [
        # a validator's own message, without pydantic's "Value error, " before it
        ({"LCS_ALPHA_GRID": "0 1.5"}, "error: LCS_ALPHA_GRID='0 1.5': alphas must be in [0, 1]"),
        # a check across settings names its variable itself, not as "settings: ..."
        ({"LCS_CHECKPOINT": "/nonexistent/x.safetensors"}, "error: LCS_CHECKPOINT=/nonexistent/x.safetensors: no such"),
    ],
)
def test_settings_errors_name_the_variable_and_its_value_and_nothing_else(
    structured: TinyCheckpoint,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    line: str,
) -> None:
    code, err = _main_with(monkeypatch, capsys, **{"LCS_CHECKPOINT": str(structured.path), **env})
    assert code == 2
    assert err.startswith(line), err
    assert len(err.strip().splitlines()) == 1 and "Value error" not in err


@pytest.mark.parametrize("key", ["s3cret\n", " s3cret"])
def test_an_api_key_no_request_can_match_is_refused_without_showing_it(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """A header's value arrives stripped of surrounding whitespace, so a key read with its file's newline
    could never match (every call 401)."""
    code, err = _main_with(monkeypatch, capsys, LCS_CHECKPOINT=str(structured.path), LCS_API_KEY=key)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: LCS_API_KEY: ")
    assert "whitespace" in err and "s3cret" not in err


@pytest.mark.parametrize("key", ["clé-2024", "s3\tcret", "s3cr\x7ft"])
def test_an_api_key_beyond_printable_ascii_is_refused_without_showing_it(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """Header values reach the service as bytes read as Latin-1, and clients encode a non-ASCII key as UTF-8
    (curl), Latin-1 (requests) or not at all (httpx): LCS_API_KEY=clé answered 403 "wrong API key" to the
    right key sent as UTF-8. A key of printable ASCII reads the same from every client; any other is refused
    at start-up, naming the fix (control characters too: HTTP parsers refuse most of them in a header)."""
    monkeypatch.setenv("LCS_API_KEY", key)
    with pytest.raises(ValidationError) as e:
        Settings(checkpoint=structured.path)
    (line,) = settings_errors(e.value)
    assert line.startswith("LCS_API_KEY: ") and "printable ASCII" in line and "openssl rand -hex" in line
    assert key not in line


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_means_none(structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """It turned the admin endpoints on with a key no request could send (every call 401); an env file's
    `LCS_API_KEY=` now leaves them off, as an empty LCS_MODEL_NAME or LCS_PROMETHEUS_URL means unset."""
    monkeypatch.setenv("LCS_API_KEY", key)
    assert Settings(checkpoint=structured.path).api_key is None


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_thread_count_means_the_default(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """docker-compose.yml passes the shell's LCS_THREADS through, an empty one too, which stopped start-up
    ('Input should be a valid integer'); the other variables there take compose's ${VAR:-default}."""
    from service.cgroups import inference_threads

    monkeypatch.setenv("LCS_THREADS", value)
    assert Settings(checkpoint=structured.path).threads == inference_threads()


def test_help_lists_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    assert "LCS_PORT" in out and "8000" in out
    assert "models/structured_line.safetensors" in out
    from service.settings import Settings

    for name in Settings.model_fields:
        assert f"LCS_{name.upper()} " in out, name


def test_help_shows_the_default_checkpoint_where_it_is_and_whether_it_is_there(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It showed the path relative to the source tree, whatever the working directory: installed from a
    wheel, `models/structured_line.safetensors` named a file that was in neither place."""
    from service.settings import DEFAULT_CHECKPOINT, Settings

    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    assert f"LCS_CHECKPOINT{' ' * 23}{DEFAULT_CHECKPOINT}\n" in capsys.readouterr().out
    missing = tmp_path / "site-packages" / "models" / "structured_line.safetensors"
    monkeypatch.setattr(Settings.model_fields["checkpoint"], "default", missing)
    assert main(["--help"]) == 0
    assert f"LCS_CHECKPOINT{' ' * 23}site-packages/models/structured_line.safetensors (not here: set it)\n" in (
        capsys.readouterr().out
    )
    monkeypatch.setenv("LCS_CHECKPOINT", "/app/models/structured_line.safetensors")  # as the image does
    assert main(["--help"]) == 0
    assert "(not here; LCS_CHECKPOINT=/app/models/structured_line.safetensors is set)\n" in capsys.readouterr().out


def test_arguments_are_refused_with_the_environment_variable_they_meant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "9000", "--max-batch=8", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m service takes no arguments")
    assert "LCS_PORT=9000 LCS_MAX_BATCH=8 python -m service" in err
    assert "--help" in err


def test_a_checkpoint_that_fails_its_self_check_stops_the_service(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny model is untrained: ~10 % on its sample images where it records 61.5-88 %, as a model whose
    weights were corrupted after training would. The server binds, fails its warm-up and exits with the
    reason, rather than staying unready for ever."""
    code, err = _main_with(
        monkeypatch, capsys, LCS_CHECKPOINT=str(structured.path), LCS_PORT=str(free_port()), LCS_SELF_CHECK_MARGIN="15"
    )
    assert code == 2
    last = err.strip().splitlines()[-1]  # after uvicorn's own start-up and shutdown lines
    assert last.startswith(f"error: {structured.path}: start-up self-check failed")
    assert "LCS_SELF_CHECK_MARGIN" in last and "against 88.0 %" in last


def test_a_checkpoint_whose_outputs_overflow_stops_the_service(structured: TinyCheckpoint, tmp_path: Path) -> None:
    """Finite weights that overflow (float32's largest in the classifier) load, and every answer was NaN: a
    500 "internal error" per request, on a service that said it was ready (found by fuzzing the checkpoint).
    With no accuracy recorded, or the margin off (as here), the accuracy check passed it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(structured.path)
    with safe_open(str(structured.path), "pt") as f:
        metadata = f.metadata()
    for k in ("fc.weight0", "fc.weight1"):
        tensors[k] = torch.full_like(tensors[k], torch.finfo(torch.float32).max)
    bad = tmp_path / "overflow.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    runtime = Runtime.load(make_settings(bad, self_check_margin=100.0))  # in process: no server to hang in
    with pytest.raises(CheckpointError) as e:
        runtime.warm_up()
    assert str(e.value).startswith(f"{bad}: start-up self-check failed: the model gives NaN or Inf outputs")
    assert "at alpha 0, 0.5, 1;" in str(e.value) and "Restore or retrain the checkpoint" in str(e.value)


@pytest.mark.parametrize("level", ["info", "warning", "debug"])
def test_httpx_and_httpcore_request_lines_never_show(level: str) -> None:
    """httpx logs each request at info, URL and credentials included: with LCS_PROMETHEUS_URL set, two lines
    every control interval, and at debug a password in the URL 240 times a minute beside httpcore's traces."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    before = [lg.level for lg in loggers]
    try:
        configure_logging(level)
        assert not any(lg.isEnabledFor(logging.INFO) for lg in loggers)
    finally:
        for lg, was in zip(loggers, before, strict=True):
            lg.setLevel(was)


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, msg, args, None)


def test_uvicorns_error_for_an_answer_whose_client_left_is_dropped() -> None:
    """Observe logs a client gone under its answer at info; uvicorn added an ERROR for each, the only lines left
    at LCS_LOG_LEVEL=error. Its other errors stay."""
    lines = UvicornLines()
    assert not lines.filter(_record("ASGI callable returned without completing response."))
    assert lines.filter(_record("Exception in ASGI application"))


def test_uvicorns_lines_for_requests_it_answers_itself_come_once_a_minute_a_kind() -> None:
    """1,000 malformed requests wrote 1,000 warnings, 1,000 WebSocket upgrades 2,000 lines: a client could grow
    the log at its request rate."""
    clock = [0.0]
    lines = UvicornLines(every=60.0, clock=lambda: clock[0])
    kept = []
    for second in range(120):
        clock[0] = float(second)
        for record in (_record("Invalid HTTP request received."), _record('%s - "WebSocket %s" 403', "ip", "/p")):
            if lines.filter(record):
                kept.append(record.getMessage())
    assert kept == [
        "Invalid HTTP request received.",
        'ip - "WebSocket /p" 403',
        "Invalid HTTP request received. (and 59 more like it since the last such line, not logged)",
        'ip - "WebSocket /p" 403 (and 59 more like it since the last such line, not logged)',
    ]
    assert lines.filter(_record("Started server process [%d]", 1))  # others pass


def test_a_key_given_as_an_argument_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    """`--api-key hunter2` printed the key twice to stderr, which ends in collected logs."""
    assert main(["--api-key", "hunter2"]) == 2
    assert main(["--api-key=hunter2"]) == 2
    assert main(["--api-key", "-hunter2"]) == 2  # token_urlsafe starts 1 key in 64 with "-"
    assert main(["--api-key", "--hunter2"]) == 2  # and 1 in 4,096 with "--"
    err = capsys.readouterr().err
    assert "hunter2" not in err and err.count("LCS_API_KEY=<key> python -m service") == 4, err
    assert main(["--api-key", "--port", "9"]) == 2  # no key given: the next flag is still named
    assert "LCS_API_KEY=<value> LCS_PORT=9 python -m service" in capsys.readouterr().err


def test_pillow_writes_no_line_per_image_even_at_debug() -> None:
    """At LCS_LOG_LEVEL=debug (the dev overlay's) Pillow logged two lines per PNG decoded."""
    pil_log = logging.getLogger("PIL")
    before = pil_log.level
    try:
        configure_logging("debug")
        assert not pil_log.isEnabledFor(logging.DEBUG) and pil_log.isEnabledFor(logging.WARNING)
    finally:
        pil_log.setLevel(before)
