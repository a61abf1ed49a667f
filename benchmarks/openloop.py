"""Load generation on 127.0.0.1 for the load and overload benchmarks: open loop and closed loop.

httpx spends about 1 ms of client CPU per request. On a 2-core machine shared with the server that caps
an open-loop generator near 200 requests/s and takes CPU the server needs, so these benchmarks use a lean
HTTP/1.1 client instead: it writes one pre-built request and reads the status line, headers and a
Content-Length body over asyncio streams (on uvloop), a few tens of microseconds per request.

Open loop: arrival times are fixed in advance, and each arrival is sent at its time on an idle keep-alive
connection, or a new one, up to `connections`; a slow answer never slows the sender. An arrival that finds
every connection busy waits client-side; latency counts from its scheduled time, so that wait is charged
to the system. One still unsent `max_lag` seconds after its time is skipped and counted (the generator,
not the service, fell behind), so a run stays bounded in time.

`image_request` builds the request of a benchmark's mix: images per request, in one of three formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
KEEP_ALIVE_S = 4.0  # reuse a connection idle for less than this (uvicorn closes idle ones after 5 s)


def free_port() -> int:
    """A port on HOST that no process listens on, for a server a benchmark starts: a fixed one may be taken,
    and a server already there would answer in its place."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Reply:
    at: float  # scheduled arrival, s from the start
    sent: float  # s from the start
    done: float  # s from the start
    status: int | str  # the HTTP status, or "reset" / "timeout" / an exception name
    retry_after: str | None = None
    body: bytes = b""  # a 200's; empty for any other answer

    @property
    def latency(self) -> float:
        """From the scheduled arrival: what an open-loop client experiences."""
        return self.done - self.at

    @property
    def service_latency(self) -> float:
        """From the send: what the service (not the generator's lag) controls."""
        return self.done - self.sent

    def json(self) -> Any:
        return json.loads(self.body)


class HTTPFailure(Exception):
    """The connection broke or the answer was not HTTP/1.1 the client can read."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()

    @classmethod
    async def open(cls, port: int) -> Connection:
        # connect a socket of our own: open_connection(host, port) resolves the address in the default
        # thread pool, which stalls new connections for a burst of arrivals
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request, read one response: (status, lower-cased headers, body)."""
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise HTTPFailure("connection closed before the response") from e
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPFailure(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" not in headers:
            raise HTTPFailure("response without Content-Length")
        try:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        except asyncio.IncompleteReadError as e:
            raise HTTPFailure("connection closed inside the body") from e
        self.idle_since = time.monotonic()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return int(parts[1]), headers, body

    def reusable(self) -> bool:
        return not self.writer.is_closing() and time.monotonic() - self.idle_since < KEEP_ALIVE_S

    def close(self) -> None:
        self.writer.close()


def post(
    path: str, body: bytes, port: int, content_type: str = "application/json", headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one keep-alive POST request."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Pool:
    """Keep-alive connections to 127.0.0.1:port, at most `size` in use at once."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float) -> AsyncIterator[Connection]:
        """A connection for one exchange: waits while all `size` are in use, reuses an idle one or opens one."""
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                c = self._idle.pop()
                if c.reusable():
                    conn = c
                else:
                    c.close()
            if conn is None:
                conn = await asyncio.wait_for(Connection.open(self.port), timeout)
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if conn.reusable():
                self._idle.append(conn)

    async def request(self, request: bytes, timeout: float) -> tuple[int, dict[bytes, bytes], bytes]:
        async with self.connection(timeout) as conn:
            return await asyncio.wait_for(conn.exchange(request), timeout)

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()


def _failure(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, HTTPFailure | ConnectionError):
        return "reset"
    return type(e).__name__


async def open_loop(
    port: int,
    request: bytes | Sequence[bytes],
    arrivals: list[float],
    *,
    connections: int = 256,
    timeout: float = 10.0,
    max_lag: float = 5.0,
    stop: asyncio.Event | None = None,
    start: float | None = None,
) -> tuple[list[Reply], int]:
    """Send `request` at each arrival time (s from the start: `start` by time.perf_counter, by default 0.1 s
    from now), or the requests of a sequence in turn; returns (replies by arrival, skipped). Once `stop` is set
    no further arrival is sent: the run ends when the requests in flight are answered (or time out)."""
    cycle = [request] if isinstance(request, bytes) else list(request)
    pool = Pool(port, connections)
    clock = time.perf_counter  # not the loop's clock: uvloop's counts whole milliseconds
    # a full garbage collection over a large heap (torch, the test session) stalls the loop for 100+ ms,
    # sending a burst late: freeze what exists, and collect nothing until the run is over
    gc.freeze()
    gc.disable()
    start = clock() + 0.1 if start is None else start
    replies: list[Reply] = []
    skipped = 0

    async def one(at: float, request: bytes) -> None:
        nonlocal skipped
        sent = at
        try:
            async with pool.connection(timeout) as conn:  # waits (client-side) while every connection is busy
                sent = clock() - start
                if sent - at > max_lag:
                    skipped += 1
                    return
                status, headers, body = await asyncio.wait_for(conn.exchange(request), timeout)
        except Exception as e:  # counted by kind: resets, timeouts
            replies.append(Reply(at, sent, clock() - start, _failure(e)))
            return
        retry = headers.get(b"retry-after")
        replies.append(
            Reply(
                at,
                sent,
                clock() - start,
                status,
                None if retry is None else retry.decode("latin-1"),
                body if status == 200 else b"",
            )
        )

    tasks: set[asyncio.Task[None]] = set()
    try:
        i = 0
        while i < len(arrivals):
            now = clock() - start
            while i < len(arrivals) and arrivals[i] <= now:  # everything due by now, in one go
                task = asyncio.create_task(one(arrivals[i], cycle[i % len(cycle)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < len(arrivals):
                await asyncio.sleep(max(0.0, arrivals[i] - (clock() - start)))
            if stop is not None and stop.is_set():  # seen within one gap between arrivals
                break
        while tasks:
            await asyncio.gather(*list(tasks))
    finally:
        pool.close()
        gc.enable()
        gc.unfreeze()
    return sorted(replies, key=lambda r: r.at), skipped


async def closed_loop(
    port: int, request: bytes, seconds: float, *, concurrency: int = 8, warmup: float = 1.0, timeout: float = 10.0
) -> tuple[float, int]:
    """Throughput with `concurrency` clients each keeping one request in flight: (answers 200 per second,
    answers of any other status), counting those that arrive in the `seconds` after `warmup`, with the clients
    busy through both. (With clients of its own, the window began as every client sent, and an answer due at
    its very end fell just after it: a round of answers lost, up to 1 in 40 at the load benchmark's 4 s.)"""
    pool = Pool(port, concurrency)
    start = time.monotonic() + warmup
    end = start + seconds
    done = other = 0

    async def client() -> None:
        nonlocal done, other
        while time.monotonic() < end:
            status, _, _ = await pool.request(request, timeout)
            if start <= time.monotonic() <= end:  # answers in the window only
                done += status == 200
                other += status != 200

    try:
        await asyncio.gather(*[client() for _ in range(concurrency)])
        return done / seconds, other
    finally:
        pool.close()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop where installed (it comes with uvicorn[standard]): a cheaper client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def answer(port: int, req: bytes) -> tuple[int, bytes]:
    """The status and body of one `req` sent to the server on `port`."""
    pool = Pool(port, 1)
    try:
        status, _, body = await pool.request(req, 10.0)
    finally:
        pool.close()
    return status, body


def check_accepted(port: int, req: bytes, mix: str) -> None:
    """Refuse a mix the server refuses (more images than its LCS_MAX_INPUTS, say) before measuring it: every
    request would be refused and capacity measured as 0 (load scaled its traces to nothing; overload said
    only that capacity was 0)."""
    status, body = run(answer(port, req))
    if status != 200:
        try:
            detail = json.loads(body)["detail"]
        except (ValueError, KeyError, TypeError):
            detail = body[:200].decode("utf-8", "replace")
        raise SystemExit(f"error: {mix}: the server refuses it ({status}: {detail}); change the mix")


def image_request(images: int, fmt: str, port: int, model: str) -> bytes:
    """One HTTP request holding `images` copies of one 28x28 test image: raw JSON pixel arrays or base64
    PNGs to /predict, or (binary) raw uint8 pixels to the OIP v2 path with the binary tensor extension."""
    import base64
    import io

    from PIL import Image

    pixels = [[(11 * r + 5 * c) % 256 for c in range(28)] for r in range(28)]
    if fmt == "json":
        return post("/predict", json.dumps({"inputs": [pixels] * images}).encode(), port)
    if fmt == "binary":
        raw = bytes(v for row in pixels for v in row) * images
        tensor = {"name": "input", "shape": [images, 1, 28, 28], "datatype": "UINT8"}
        head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return post(
            f"/v2/models/{model}/infer",
            head + raw,
            port,
            "application/octet-stream",
            {"Inference-Header-Content-Length": str(len(head))},
        )
    buf = io.BytesIO()
    Image.frombytes("L", (28, 28), bytes(v for row in pixels for v in row)).save(buf, format="PNG")
    body = json.dumps({"inputs": [base64.b64encode(buf.getvalue()).decode()] * images}).encode()
    return post("/predict", body, port)
