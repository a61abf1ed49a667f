"""Service configuration: LCS_-prefixed environment variables, read once, refused at start-up if bad."""

from __future__ import annotations

import ast
import difflib
import itertools
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lcs.alpha import SAME_ALPHA
from lcs.checkpoint import message
from lcs.paths import file_problem
from service.cgroups import default_bodies_max_bytes, inference_threads
from service.controller import BATTERY_ALPHA_CAP, BATTERY_LOW_PERCENT, POLICY, parse_policy

Backend = Literal["onnxruntime", "torchscript"]  # what runs the float networks (service/materialize.py)
BACKEND: Backend = "onnxruntime"  # LCS_BACKEND's default, and materialize.build's
MAX_BATCH = 32  # LCS_MAX_BATCH's default, and materialize.build's

# the shipped model: in a repository checkout (and in the image, which sets LCS_CHECKPOINT to its copy); a
# package installed from a wheel ships no models
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "structured_line.safetensors"
N = TypeVar("N", int, float)
# a model name is a path segment of the v2 API (/v2/models/{name}/infer), which a client percent-encodes
# and the server decodes before matching: any name is addressable but one holding '/' (it decodes into two
# segments), '.' and '..' (clients resolve them away), control characters and surrounding spaces
MODEL_NAME = re.compile(r"(?!\.{1,2}$)[^/\x00-\x1f\x7f\s](?:[^/\x00-\x1f\x7f]*[^/\x00-\x1f\x7f\s])?")
MODEL_NAME_RULE = "no '/', control characters or surrounding spaces, and not '.' or '..' (it is a URL path segment)"


def display_path(path: Path) -> str:
    """A path as a person types it: relative to the working directory where it lies under it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _checkpoint_fix(path: Path) -> str:
    fix = "point it at a .safetensors checkpoint written by `python -m training train`"
    if path == DEFAULT_CHECKPOINT:
        return f"{fix} (its default, the shipped model, comes with a repository checkout, not an installed package)"
    if DEFAULT_CHECKPOINT.is_file():
        return f"{fix}, or unset it to serve the shipped model ({display_path(DEFAULT_CHECKPOINT)})"
    return fix


def _numbers(v: str, parse: Callable[[str], N], expected: str) -> list[N]:
    """Comma- or space-separated numbers; one that does not parse is refused saying what is expected."""
    out = []
    for x in v.replace(",", " ").split():
        try:
            out.append(parse(x))
        except ValueError:
            raise ValueError(f"cannot read {x!r}; expected {expected}") from None
    return out


def _floats(v: object) -> object:
    if isinstance(v, str):
        v = v.strip()
        if v in ("", "all", "checkpoint"):
            return None
        return _numbers(v, float, "comma-separated alphas in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    return v


PROFILE_BATCHES = (1, 8, 32)  # the default profile's batch sizes, those above LCS_MAX_BATCH replaced by it


def _default_profile_batches(data: dict[str, Any]) -> list[int]:
    return sorted({min(b, data["max_batch"]) for b in PROFILE_BATCHES})  # not called if max_batch was refused


# PromQL label matchers (LCS_PROMETHEUS_SELECTOR): name, operator, quoted value, comma-separated; whitespace
# as PromQL's lexer has it (Python's \s also takes a no-break space), and its escapes: Go's, each quote
# escaping only itself, code points checked in `_unquoted`
_WS = r"[ \t\r\n]*"
_ESCAPE = r"\\(?:[abfnrtv\\]|x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[0-3][0-7]{2})"
_DOUBLE = rf'"(?:[^"\\\n]|{_ESCAPE}|\\")*"'
_STRING = rf"{_DOUBLE}|'(?:[^'\\\n]|{_ESCAPE}|\\')*'"
# a name may be quoted (Prometheus 3); groups: name, operator, value
_MATCHER = rf"{_WS}([A-Za-z_][A-Za-z0-9_]*|{_DOUBLE}){_WS}(=~|!~|!=|=){_WS}({_STRING}|`[^`]*`){_WS}"
MATCHER = re.compile(_MATCHER)
SELECTOR = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*,?{_WS}")
# what Python's re and Go's RE2 both refuse; other errors are Python's alone (a flag mid-pattern, \pL)
_SHARED_REGEX_ERRORS = ("missing )", "unbalanced parenthesis", "unterminated character set", "nothing to repeat")


def _unquoted(token: str) -> str | None:
    """A matcher's name or value as PromQL reads it, or None for a code point it refuses (a surrogate, past
    U+10FFFF). A raw `value` takes no escapes."""
    if token.startswith("`"):
        return token[1:-1]
    for hexa in re.findall(r"\\(?:\\|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8}))", token):
        code = int(hexa[0] or hexa[1] or "0", 16)
        if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
            return None
    return str(ast.literal_eval(token))


def selector_problem(selector: str) -> str | None:
    """Why PromQL would refuse `selector` inside a query's braces, or None (as far as told without asking it)."""
    if not SELECTOR.fullmatch(selector):
        braces = " (without the braces)" if selector.strip().startswith("{") else ""
        return (
            f'not PromQL label matchers{braces}: expected name="value" pairs (or !=, =~, !~), comma-separated, '
            'e.g. job="lcs",namespace="prod"'
        )
    for m in MATCHER.finditer(selector):
        name, op, value = m.groups()
        label = _unquoted(name) if name.startswith('"') else name
        if (text := _unquoted(value)) is None or label is None:
            return f"{m.group(0).strip()}: an escape of a code point Unicode does not have"
        if label == "__name__":
            return "__name__ is the metric's name, which each fleet query sets; match other labels"
        if op in ("=~", "!~"):
            try:
                re.compile(text)
            except re.error as e:
                if any(shared in str(e) for shared in _SHARED_REGEX_ERRORS):
                    return f"{value} is not a regular expression ({e})"
    return None


class Settings(BaseSettings):
    """Every knob of the service. Env var = LCS_ + the field name in capitals (LCS_PORT, ...)."""

    # allow_inf_nan: "inf" seconds passed every bound and failed later (every /predict 500 at an infinite
    # control interval, a traceback at start-up for an infinite drain)
    model_config = SettingsConfigDict(env_prefix="LCS_", extra="ignore", frozen=True, allow_inf_nan=False)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    checkpoint: Path = DEFAULT_CHECKPOINT
    model_name: str | None = None  # default: the checkpoint's file stem
    # intra-op threads for inference: torch's, and the size of ONNX Runtime's one pool (fixed when the first
    # session is made, service/materialize.py). Default: one per CPU this process may use, less one for the
    # event loop (service.cgroups.inference_threads)
    threads: int = Field(default_factory=inference_threads, ge=1, le=256)
    # alphas the service serves: requested alphas snap *down* to this grid. None: the checkpoint's grid.
    alpha_grid: Annotated[list[float] | None, NoDecode] = None
    prebuild: Annotated[list[float] | None, NoDecode] = None  # built at start-up; None: the whole grid
    cache_bytes: int = Field(256 * 2**20, ge=0)  # LRU bound on materialised models, in bytes
    # what runs the float networks: ONNX Runtime, or frozen TorchScript (service/materialize.py has the
    # measured difference). The int8 network always runs on torch's FX kernels, as TorchScript.
    backend: Backend = BACKEND
    # TorchScript's memory layout (ONNX Runtime picks its own). auto: measured at start-up under
    # LCS_BACKEND=torchscript; under onnxruntime, off (only a network that failed to export runs as TorchScript)
    channels_last: Literal["auto", "on", "off"] = "auto"
    max_batch: int = Field(MAX_BATCH, ge=1, le=1024)  # images per batch
    # how long a partial batch waits for company; 0: dispatch at once when the model is idle (batches
    # still form from what queues up while a batch runs), which keeps low-load latency at its floor
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    queue_max: int = Field(256, ge=1)  # queued requests; beyond it: 429 + Retry-After
    max_inputs: int = Field(64, ge=1)  # images per request
    max_body_bytes: int = Field(8 * 2**20, ge=1024)  # larger bodies get 413
    # the bodies of inference requests being read and decoded at once, in bytes (by Content-Length; a chunked
    # body counts as LCS_MAX_BODY_BYTES): beyond it a new one gets 429 before its body is read. Default: a
    # quarter of the memory granted (the cgroup limit, else the machine's)
    bodies_max_bytes: int = Field(default_factory=default_bodies_max_bytes, ge=1024)
    # an inference request's body must arrive within this: a stalled upload holds a place in the queue
    body_timeout_seconds: float = Field(10.0, gt=0.0)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # pixels a request's encoded images decode to, all together
    top_k: int = Field(3, ge=1)
    # start-up fails if, at any prebuilt alpha, the model classifies the checkpoint's sample images this many
    # points worse than the test accuracy the checkpoint records there: corrupt weights or statistics that
    # still load. Measured: every shipped checkpoint at every grid alpha at most 4.0 points below; 200 bytes
    # flipped in one endpoint of a conv weight, up to 87 below; statistics rows reversed, 59 below at 1. 100: off
    self_check_margin: float = Field(15.0, ge=0.0, le=100.0)
    # batch sizes in the latency profile (default: each at most max_batch); larger batches (one request of more
    # images) are predicted in proportion to the largest size (the int8 network runs them in chunks of it)
    profile_batches: Annotated[list[int], NoDecode] = Field(default_factory=_default_profile_batches)
    slo_p99_seconds: float = Field(0.1, gt=0.0)  # latency objective, a histogram bucket edge
    control_interval_seconds: float = Field(0.5, gt=0.0)
    # share of each request's time budget the batcher keeps in reserve when it picks a batch's alpha: room
    # for requests that arrive while a batch runs, for prediction error and for the response path
    slack_reserve: float = Field(0.4, ge=0.0, lt=1.0)
    # lcs (ours); fixed:<alpha>, step and aimd exist for the load benchmark's comparison
    policy: str = POLICY
    battery_low_percent: float = Field(BATTERY_LOW_PERCENT, ge=0.0, le=100.0)
    battery_alpha_cap: float = Field(BATTERY_ALPHA_CAP, ge=0.0, le=1.0)  # ceiling while on battery below the low mark
    # share of memory available (a cgroup limit's if tighter) below which the cache drops the models not asked
    # for lately (service.state.IDLE_MODEL_SECONDS); 0: never
    memory_low: float = Field(0.1, ge=0.0, le=1.0)
    prometheus_url: str | None = None  # fleet signals from a Prometheus server, if set
    prometheus_timeout_seconds: float = Field(0.2, gt=0.0)
    prometheus_selector: str = ""  # PromQL label matchers for this fleet's series, e.g. job="lcs",namespace="prod"
    prometheus_window_seconds: float = Field(30.0, ge=1.0)  # rate() window; at least 2 scrape intervals
    api_key: SecretStr | None = None  # admin endpoints are off without one
    drain_seconds: float = Field(10.0, ge=0.0)  # SIGTERM: finish queued work for up to this long
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _lists = field_validator("alpha_grid", "prebuild", mode="before")(_floats)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        parse_policy(v)
        return v

    @field_validator("threads", "host", "bodies_max_bytes", mode="before")
    @classmethod
    def _blank_is_the_default(cls, v: object, info: ValidationInfo) -> object:
        """`LCS_THREADS=`, as compose passes a shell's empty variable through, is the default, not a refusal.
        So is `LCS_HOST=`, which uvicorn took as every interface (0.0.0.0 and ::): the service exposed where
        nothing asked for it."""
        if not (isinstance(v, str) and not v.strip()):
            return v
        if info.field_name == "bodies_max_bytes":
            return default_bodies_max_bytes()
        return inference_threads() if info.field_name == "threads" else cls.model_fields["host"].default

    @field_validator("prometheus_selector")
    @classmethod
    def _label_matchers(cls, v: str) -> str:
        # sent inside the fleet queries' braces: one PromQL cannot parse made every query a 400, reported as
        # Prometheus not answering, and the controller ran on local signals with no word of the setting
        if v.strip() and (problem := selector_problem(v)) is not None:
            raise ValueError(problem)
        return v.strip()

    @field_validator("model_name", "prometheus_url", "api_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        """An empty value, as an env file's `LCS_API_KEY=` or a compose file's `${VAR:-}` gives, is the
        setting left unset (the default name, no fleet signals, admin off) rather than a refusal."""
        text = v.get_secret_value() if isinstance(v, SecretStr) else v
        return None if isinstance(text, str) and not text.strip() else v

    @field_validator("model_name")
    @classmethod
    def _path_safe_name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME.fullmatch(v):
            raise ValueError(f"not a usable model name: use {MODEL_NAME_RULE}, e.g. fashion-v2")
        return v

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        expected = "expected an http(s) URL with a host, e.g. http://prometheus:9090 (unset: local signals only)"
        try:
            url = urlsplit(v.strip())
            url.port  # noqa: B018 (raises ValueError for a port that is not a number in 0-65535)
        except ValueError as e:
            raise ValueError(f"{e}; {expected}") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(expected)
        return v.strip()

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, v: SecretStr | None) -> SecretStr | None:
        # the admin check compares the key with a request header's value, which HTTP strips of surrounding
        # whitespace: a key with a trailing newline could never match
        if v is None:
            return v
        if (key := v.get_secret_value()) != key.strip():
            raise ValueError(
                "the key starts or ends with whitespace (a trailing newline from the file it came from?), "
                "which no request header can carry, so no request could match it; remove the whitespace"
            )
        if not (key.isascii() and key.isprintable()):
            # header bytes are read as Latin-1, and clients encode other characters as UTF-8 (curl), Latin-1
            # (requests) or not at all (httpx): LCS_API_KEY=clé answered 403 to the right key sent as UTF-8
            raise ValueError(
                "the key holds characters other than printable ASCII, which HTTP clients send in a header "
                "in different encodings (or not at all), so requests may never match it; use printable "
                "ASCII, e.g. the output of `openssl rand -hex 24`"
            )
        return v

    @field_validator("profile_batches", mode="before")
    @classmethod
    def _ints(cls, v: object) -> object:
        if isinstance(v, str):
            return _numbers(v, int, "comma-separated whole numbers (batch sizes), e.g. 1,8,32")
        return v

    @field_validator("profile_batches")
    @classmethod
    def _batch_sizes(cls, v: list[int], info: ValidationInfo) -> list[int]:
        if not v:
            raise ValueError("no batch sizes; give some, e.g. 1,8,32, or unset it for the default")
        if small := [b for b in v if b < 1]:
            raise ValueError(f"batch sizes must be at least 1; got {small}")
        # the largest batch the service runs: LCS_MAX_BATCH images gathered from several requests, or one
        # request of up to LCS_MAX_INPUTS, which runs as a batch of its own (either absent: it was refused)
        batch, inputs = info.data.get("max_batch"), info.data.get("max_inputs")
        if batch is not None and inputs is not None and (big := [b for b in v if b > max(batch, inputs)]):
            raise ValueError(
                f"batch sizes {big} are larger than any batch the service runs (LCS_MAX_BATCH={batch} images from "
                f"several requests, LCS_MAX_INPUTS={inputs} in one); profile sizes up to the larger"
            )
        return sorted(set(v))

    @field_validator("alpha_grid", "prebuild")
    @classmethod
    def _in_unit_interval(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            bad = [a for a in v if not 0.0 <= a <= 1.0]
            if bad:
                raise ValueError(f"alphas must be in [0, 1] (1 = least compressed); got {bad}")
            if not v:
                raise ValueError("give at least one alpha, or leave unset for the checkpoint's grid")
            v = sorted(set(v))
            if twins := [(a, b) for a, b in itertools.pairwise(v) if b - a < SAME_ALPHA]:
                a, b = twins[0]
                raise ValueError(f"{a} and {b} are one alpha spelt twice (closer than {SAME_ALPHA:g}); give it once")
        return v

    @model_validator(mode="after")
    def _checkpoint_and_name(self) -> Settings:
        if (problem := file_problem(self.checkpoint)) is not None:
            raise ValueError(f"LCS_CHECKPOINT={self.checkpoint}: {problem}; {_checkpoint_fix(self.checkpoint)}")
        if self.model_name is None and not MODEL_NAME.fullmatch(self.checkpoint.stem):
            raise ValueError(
                f"LCS_MODEL_NAME is unset, and the name it defaults to, the file stem of LCS_CHECKPOINT="
                f"{self.checkpoint} ({self.checkpoint.stem!r}), is not a usable model name: set LCS_MODEL_NAME "
                f"({MODEL_NAME_RULE}), or rename the file"
            )
        return self


def unknown_variables(environ: Mapping[str, str]) -> str | None:
    """One line naming each LCS_ variable that is no setting, with the setting it is closest to (a typo:
    LCS_PROT), or None. Not refused: a variable of another tool may share the prefix. LCS_SERVE_* are
    Kubernetes' service links for a Service named lcs-serve (LCS_SERVE_PORT=tcp://..., ...)."""
    names = sorted(
        n
        for n in environ
        if n.upper().startswith("LCS_")
        and not n.upper().startswith("LCS_SERVE_")
        and n[4:].lower() not in Settings.model_fields  # read case-insensitively, as pydantic-settings does
    )
    if not names:
        return None
    hints = []
    for n in names:
        close = difflib.get_close_matches(n[4:].lower(), Settings.model_fields, n=1)
        hints.append(f"{n} (did you mean LCS_{close[0].upper()}?)" if close else n)
    return f"ignoring LCS_ variables that are not settings: {', '.join(hints)}; `python -m service --help` lists them"


def redact_url(url: str) -> str:
    """`url` without the user and password it may carry (scheme://user:password@host/...), as it may be
    shown in logs and errors; by text, so a URL too malformed to parse is redacted too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    return f"{scheme}{sep}{authority.rpartition('@')[2]}{slash}{path}"


def settings_errors(e: ValidationError) -> list[str]:
    """One line per refused setting, naming the variable and the value it had (`LCS_PORT=abc: ...`); a
    check across settings (no location) names its variables itself. Secrets are never shown."""
    lines = []
    for err in e.errors():
        if err["type"] == "default_factory_not_called":
            continue  # a default that follows a refused setting (profile_batches): that one is reported
        msg = message(err)
        if not err["loc"]:
            lines.append(msg)
            continue
        name = str(err["loc"][0])
        field = Settings.model_fields.get(name)
        secret = field is not None and SecretStr in (field.annotation, *get_args(field.annotation))
        value = err.get("input")
        if name == "prometheus_url" and isinstance(value, str):
            value = redact_url(value)
        # the value as the environment spelled it (an item of a list given in Python: the item alone)
        shown = "" if value is None or secret or len(err["loc"]) > 1 else "=" + shlex.quote(str(value))
        lines.append(f"LCS_{name.upper()}{shown}: {msg}")
    return lines
