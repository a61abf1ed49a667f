"""`python -m service`: validate settings and checkpoint, then serve with uvicorn (LCS_HOST:LCS_PORT)."""

from __future__ import annotations

import gc
import logging
import sys

import uvicorn
from pydantic import ValidationError

from lcs.checkpoint import CheckpointError
from service.app import create_app
from service.runtime import Runtime, inference_executor
from service.settings import Settings


def main() -> int:
    executor = inference_executor()  # torch work runs on this thread only
    try:
        settings = Settings()
        # fail fast, before binding the port, with a message naming the problem
        runtime = executor.submit(Runtime.load, settings).result()
    except ValidationError as e:
        for err in e.errors():
            field = "LCS_" + "_".join(str(p) for p in err["loc"]).upper() if err["loc"] else "settings"
            print(f"error: {field}: {err['msg']}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings, runtime=runtime, executor=executor),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_seconds) + 1,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
