"""`python -m service`: validate settings and checkpoint, then serve with uvicorn (LCS_HOST:LCS_PORT).

It takes no arguments: every setting is an LCS_ environment variable (`--help` lists them with their
defaults; README.md's Configuration table says what each does)."""

from __future__ import annotations

import signal
import sys

# SIGTERM before uvicorn installs its handlers (importing torch, loading the checkpoint, building: seconds)
# ends the process as uvicorn's exit would (143). As a container's PID 1, which the kernel gives no default
# action for it, such a SIGTERM was ignored: the service became ready and the stop waited for SIGKILL.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

import errno  # noqa: E402  (the handler first: these imports take seconds)
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import uvicorn  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from lcs.checkpoint import CheckpointError  # noqa: E402
from service.app import create_app  # noqa: E402
from service.runtime import Runtime, inference_executor  # noqa: E402
from service.settings import Settings, display_path, settings_errors, unknown_variables  # noqa: E402
from service.throttle import Throttle  # noqa: E402

log = logging.getLogger("lcs.service")


def usage() -> str:
    """The settings as environment variables with their defaults, from `Settings` itself."""
    rows = []
    defaults: dict[str, object] = {}  # a default that follows another setting's (profile_batches) sees it
    for name, field in Settings.model_fields.items():
        default = defaults[name] = field.get_default(call_default_factory=True, validated_data=defaults)
        if default is None:
            shown = "unset"
        elif default == "":
            shown = '""'
        elif isinstance(default, list):
            shown = ",".join(map(str, default))
        elif isinstance(default, Path):
            shown = display_path(default)
            if not default.exists():  # a package installed from a wheel ships no model (the image sets its own)
                given = os.environ.get(f"LCS_{name.upper()}")
                shown += f" (not here; LCS_{name.upper()}={given} is set)" if given else " (not here: set it)"
        else:
            shown = str(default)
        rows.append(f"  LCS_{name.upper():<32} {shown}")
    return "\n".join(
        [
            "usage: [LCS_<SETTING>=<value> ...] python -m service",
            "",
            "Serve one LCS checkpoint over HTTP. There are no command-line options: each setting is an",
            "environment variable, read once at start-up (README.md, Configuration, says what each does).",
            "",
            "settings and their defaults (threads and bodies: this machine's):",
            *rows,
        ]
    )


def _is_flag(arg: str) -> bool:
    """Whether `arg` is a setting's command-line spelling, as `--port` or `--max-batch=8`."""
    name = arg.partition("=")[0].removeprefix("--").replace("-", "_").lower()
    return arg.startswith("--") and name in Settings.model_fields


def _refuse_arguments(args: list[str]) -> str:
    """The error for command-line arguments, naming the environment variable each flag meant."""
    hints, shown = [], list(args)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        name = flag.removeprefix("--").replace("-", "_").lower()
        if flag.startswith("--") and name in Settings.model_fields:
            if not eq:
                following = args[i + 1] if i + 1 < len(args) else ""
                value = following if following and not following.startswith("-") else "<value>"
                # the key is not echoed to a log, one that starts with "-" or "--" (1 in 64 and 1 in 4,096 of
                # token_urlsafe's) too: whatever follows is the key unless it is itself a setting's flag
                if name == "api_key" and following and not _is_flag(following):
                    shown[i + 1] = value = "<key>"
            elif name == "api_key":
                shown[i], value = f"{flag}=<key>", "<key>"
            hints.append(f"LCS_{name.upper()}={value}")
    fix = f"run `{' '.join(hints)} python -m service`" if hints else "settings are environment variables"
    got = " ".join(shown)
    return f"error: python -m service takes no arguments (got: {got}); {fix}; `python -m service --help` lists them"


class CannotListen(Exception):
    """Why the server cannot listen on LCS_HOST:LCS_PORT, naming the settings and the fix."""


def configure_logging(level: str) -> None:
    """The service's log at `level` (LCS_LOG_LEVEL). httpx logs every request it makes at info, URL and
    credentials included: the fleet's Prometheus queries wrote 14,000 lines an hour, and at debug a password
    in LCS_PROMETHEUS_URL 240 times a minute, with httpcore's 2,400 trace lines; the fleet logs its own
    failures. Pillow logs each PNG chunk it reads at debug (two lines an image). None of them is shown."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpcore", "PIL", "websockets"):
        logging.getLogger(name).setLevel(logging.WARNING)


class UvicornLines(logging.Filter):
    """uvicorn's lines, filtered. Its ERROR "ASGI callable returned without completing response." is dropped:
    here only an answer whose connection closed under it ends so, which Observe logs at info as its client
    leaving (200 pipelined requests whose client left wrote 400 such errors, the only lines left at
    LCS_LOG_LEVEL=error). Its lines for requests it answers itself (malformed HTTP; a WebSocket upgrade, which
    no route takes) came one or two a request, so any client could grow the log at its request rate: the
    first of each kind in `every` seconds is kept, the next one counting those left out."""

    GONE = "ASGI callable returned without completing response."
    PER_REQUEST = (
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        '%s - "WebSocket %s"',
        "connection rejected (",  # the websockets library's, through uvicorn's logger
    )

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every, self._clock = every, clock
        self._kinds: dict[str, Throttle] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else ""
        if text == self.GONE:
            return False
        kind = next((k for k in self.PER_REQUEST if text.startswith(k)), None)
        if kind is None:
            return True
        left_out = self._kinds.setdefault(kind, Throttle(self.every)).passes(self._clock())
        if left_out:
            record.msg = f"{text} (and {left_out} more like it since the last such line, not logged)"
        return left_out is not None


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on host:port, bound as uvicorn's asyncio server would bind them (every address the
    host resolves to, SO_REUSEADDR, IPv6 sockets IPv6-only), or CannotListen. Made before the model loads,
    so a problem is found in milliseconds rather than after the start-up (uvicorn's bare '[Errno 98]
    address already in use', 7-8 s later), and held until uvicorn serves on them, so nothing takes the port
    in between: a port taken there made the service exit 3 after the whole start-up. They listen at once,
    as only a listening socket holds a port against another SO_REUSEADDR socket (uvicorn's, asyncio's) on
    Linux; a connection made while the model loads waits in the backlog and is answered once uvicorn starts
    (`/readyz` 503 until the warm-up ends)."""
    elsewhere = "use one of this machine's addresses, e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        unknown = f"LCS_HOST={host}: not an address or a name this machine resolves ({e.strerror})"
        raise CannotListen(f"{unknown}; {elsewhere}") from None
    bound: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks (IPv6 off): asyncio skips it too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
            sock.listen()
        except OSError as e:
            for held in (*bound, sock):
                held.close()
            at = f"LCS_HOST={host} LCS_PORT={port}" + (f" (address {address[0]})" if address[0] != host else "")
            if e.errno == errno.EADDRINUSE:
                why = "address already in use (another process listens there); stop it or change LCS_PORT"
            elif e.errno == errno.EADDRNOTAVAIL:
                why = f"not an address of this machine; {elsewhere}"
            elif e.errno == errno.EACCES and port < 1024:
                why = "permission denied, ports below 1024 need privileges; choose LCS_PORT=1024 or above"
            else:
                why = f"cannot listen there ({e.strerror})"
            raise CannotListen(f"{at}: {why}") from None
        bound.append(sock)
    return bound


def main(args: list[str] | None = None) -> int:
    if args:
        if args[0] in ("-h", "--help"):
            print(usage())
            return 0
        print(_refuse_arguments(args), file=sys.stderr)
        return 2
    unknown = unknown_variables(os.environ)  # a typo (LCS_PROT) would leave its setting at the default
    try:
        settings = Settings()
    except ValidationError as e:
        if unknown:  # perhaps why a setting has the value refused
            print(f"warning: {unknown}", file=sys.stderr)
        for line in settings_errors(e):
            print(f"error: {line}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if unknown:
        log.warning(unknown)
    try:
        sockets = bind(settings.host, settings.port)
    except CannotListen as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return serve(settings, sockets)
    finally:
        for sock in sockets:  # uvicorn closes those it served on; these are the ones a refusal left bound
            sock.close()


def serve(settings: Settings, sockets: list[socket.socket]) -> int:
    """Load and check the checkpoint (a refusal: exit status 2), then serve on `sockets` until stopped."""
    executor = inference_executor()  # torch work runs on this thread only
    try:
        # fail fast, before the server starts, with a message naming the problem
        runtime = executor.submit(Runtime.load, settings).result()
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading: as after serving, no traceback (the load ends first)
        return 130
    # The event loop thread parses requests while the inference thread needs the GIL back after every
    # call that released it (the model's run, a torch op); with the default 5 ms switch interval a
    # saturated loop holds each hand-back up to 5 ms (an eager forward of ~30 ops: 150 ms). 0.1 ms bounds
    # the wait: at 0.5 ms the capacity at alpha 0 (64 binary images a request) measured 475-549 requests/s,
    # at 0.1 ms 533-584, and single-image HTTP throughput was no lower (1,495-1,600 against 1,388-1,526).
    sys.setswitchinterval(0.0001)
    # A JSON request's body becomes hundreds of Python objects (a 28x28 image: 28 lists, 784 ints), so the
    # default young-generation threshold (700 allocations) ran the collector several times per request on
    # the event loop. Nearly all of it is freed by reference counting; collecting every 100k allocations
    # served 2,022-2,155 single-image requests/s against 1,906-2,093 (wrk -c64, 2 threads, interleaved).
    gc.set_threshold(100_000, 10, 10)

    def stop() -> None:  # the warm-up failed: exit rather than stay unready for ever
        server.should_exit = True

    app = create_app(settings, runtime=runtime, executor=executor, stop=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_seconds) + 1,
        access_log=False,
        log_config=None,  # its lines go through the service's own format, with a time and the logger's name
    )
    logging.getLogger("uvicorn.error").addFilter(UvicornLines())
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # uvicorn's from here: it drains, then raises it again
    # uvicorn names the address only when it binds the sockets itself
    names = (sock.getsockname() for sock in sockets)
    urls = ", ".join(f"http://{f'[{host}]' if ':' in host else host}:{port}" for host, port, *_ in names)
    log.info("serving on %s (Ctrl-C to quit); ready once every prebuilt alpha is built and profiled", urls)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C's SIGINT again once it has shut down: no traceback
        return 130
    failure = getattr(getattr(app.state, "lcs", None), "failure", None)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
