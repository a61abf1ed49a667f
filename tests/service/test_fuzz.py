"""Property-based API fuzzing from the service's own OpenAPI schema (schemathesis + Hypothesis), in process.

Every operation in /openapi.json is driven with generated requests, in-process over ASGI (schemathesis
runs the app's lifespan; the fixture waits for the warm-up before the first case). Each response must:
not be a 5xx, carry a status code, content type, headers and body that the schema declares for it, and,
for schema-invalid (negative) requests, be a 4xx. Four kinds of cases per operation:

- positive: schema-valid requests (mostly semantically wrong: random arrays are not 12x12 images);
- negative: requests that break the schema (wrong types, missing fields, garbage bodies);
- known model: the v2 path parameter fixed to the served model, so the body checks are reached;
- well-formed: real images in every accepted layout (arrays, PNG), with generated quality, min_quality,
  deadline_ms, top_k and v2 `parameters`, so 200s (and their schema) and 429s are exercised as well;
  the admin endpoints also get the right API key.

The default run sends 332 requests (~6 s); `-m slow` runs a campaign of over 1,000 (1,292 over 17
operations in its last recorded run, session 13):

    .venv/bin/python -m pytest -p no:cacheprovider -m slow tests/service/test_fuzz.py -s
"""

from __future__ import annotations

import base64
import collections
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from service.app import create_app
from service.schemas import PRESETS
from tests.service.service_support import IMAGE, TinyCheckpoint, make_settings, wait_for

NAME = "tiny_structured"
KEY = "fuzz-key"
MAX_INPUTS = 4
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api(structured: TinyCheckpoint) -> Iterator[OpenApiSchema]:
    """The schema read from the app's /openapi.json, bound to the app, which is warmed up and ready."""
    app = create_app(make_settings(structured.path, api_key=KEY, max_inputs=MAX_INPUTS))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    try:
        with asgi.get_client(app) as client:
            wait_for(lambda: client.get("/readyz").status_code == 200, what="/readyz")
        yield schema
    finally:
        asgi.shutdown_lifespans()


# -- well-formed bodies: real images and parameters, so the 200 path is fuzzed too -------------------


@st.composite
def images(draw: st.DrawFn) -> list[Any]:
    """1..MAX_INPUTS images, each as [H, W], [1, H, W] or [H, W, 1] pixel arrays (ints or floats) or a PNG."""
    out: list[Any] = []
    for _ in range(draw(st.integers(1, MAX_INPUTS))):
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        img = rng.integers(0, 256, (IMAGE, IMAGE)).astype(np.uint8)
        layout = draw(st.sampled_from(["hw", "chw", "hwc", "float", "png"]))
        if layout == "png":
            buf = io.BytesIO()
            Image.fromarray(img, "L").save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        elif layout == "float":
            out.append((img / 1.0).tolist())
        else:
            arr = {"hw": img, "chw": img[None], "hwc": img[:, :, None]}[layout]
            out.append(arr.tolist())
    return out


quality = st.one_of(st.floats(0.0, 1.0), st.sampled_from(sorted(PRESETS)))
v2_parameters = st.fixed_dictionaries(
    {},
    optional={
        "quality": st.one_of(quality, st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none()),
        "min_quality": st.one_of(quality, st.floats(allow_nan=False, allow_infinity=False), st.none()),
        "deadline_ms": st.one_of(st.floats(-10.0, 70_000.0), st.integers(0, 100), st.text(max_size=3)),
    },
)


@st.composite
def v2_tensor(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, MAX_INPUTS))
    data = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, n * IMAGE * IMAGE).tolist()
    shape = draw(st.sampled_from([[n, 1, IMAGE, IMAGE], [n, IMAGE * IMAGE], [n, IMAGE, IMAGE]]))
    datatype = draw(st.sampled_from(["FP32", "FP64", "UINT8", "INT32", "INT64"]))
    return {"name": "input", "shape": shape, "datatype": datatype, "data": data}


# -- the campaign --------------------------------------------------------------------------------------

Stats = collections.Counter[tuple[str, int]]


def _fuzz(schema: OpenApiSchema, method: str, path: str, examples: int, stats: Stats, variant: str) -> None:
    op = schema[path][method]
    mode = GenerationMode.NEGATIVE if variant == "negative" else GenerationMode.POSITIVE
    kwargs: dict[str, Any] = {}
    if variant in ("known model", "well-formed") and "{name}" in path:
        kwargs["path_parameters"] = {"name": NAME, **({"version": "1"} if "{version}" in path else {})}
    if variant == "well-formed" and path == "/admin/pin":
        kwargs["headers"] = {"X-API-Key": KEY}
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests every run: a failure here is reproducible
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode, **kwargs), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        if variant == "well-formed" and path == "/predict":
            case.body = {**case.body, "inputs": data.draw(images())}
        elif variant == "well-formed" and path.endswith("/infer"):
            case.body = {"inputs": [data.draw(v2_tensor())], "parameters": data.draw(v2_parameters)}
        response = case.call()
        stats[(f"{method} {path}", response.status_code)] += 1
        case.validate_response(response, checks=checks)

    run()


def _has_parameters(schema: OpenApiSchema, method: str, path: str) -> bool:
    op = schema[path][method]
    return bool(op.body) or any(True for _ in op.iter_parameters())


def campaign(schema: OpenApiSchema, scale: int) -> Stats:
    """Fuzz every operation; `scale` sets the examples per (operation, variant). Returns requests by status."""
    stats: Stats = collections.Counter()
    weights = {  # relative effort: the inference routes get the most
        ("POST", "/predict"): {"positive": 3, "negative": 3, "well-formed": 4},
        ("POST", "/v2/models/{name}/infer"): {"positive": 1, "negative": 1, "known model": 3, "well-formed": 4},
        ("PUT", "/admin/pin"): {"positive": 1, "negative": 1, "well-formed": 1},
        ("DELETE", "/admin/pin"): {"positive": 1, "well-formed": 1},
        ("GET", "/v2/models/{name}"): {"positive": 1, "known model": 1},
        ("GET", "/v2/models/{name}/ready"): {"positive": 1, "known model": 1},
        ("POST", "/v2/models/{name}/versions/{version}/infer"): {"positive": 1, "negative": 1, "well-formed": 2},
        ("GET", "/v2/models/{name}/versions/{version}"): {"positive": 1, "known model": 1},
        ("GET", "/v2/models/{name}/versions/{version}/ready"): {"positive": 1, "known model": 1},
    }
    operations = [(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()]
    assert ("POST", "/predict") in operations and ("POST", "/v2/models/{name}/infer") in operations
    for method, path in operations:
        if not _has_parameters(schema, method, path):  # nothing to generate: one request
            _fuzz(schema, method, path, 1, stats, "positive")
            continue
        for variant, weight in weights[(method, path)].items():
            _fuzz(schema, method, path, weight * scale, stats, variant)
    return stats


def _report(stats: Stats) -> str:
    by_op: dict[str, dict[int, int]] = collections.defaultdict(dict)
    by_status: collections.Counter[int] = collections.Counter()
    for (op, status), n in sorted(stats.items()):
        by_op[op][status] = n
        by_status[status] += n
    lines = [f"{sum(stats.values())} requests; by status {dict(sorted(by_status.items()))}"]
    return "\n".join(lines + [f"  {op}: {codes}" for op, codes in by_op.items()])


def test_fuzz_every_operation(api: OpenApiSchema) -> None:
    stats = campaign(api, scale=10)
    print(_report(stats))
    assert sum(stats.values()) >= 250
    assert not [s for (_, s) in stats if s >= 500]
    served = {op for (op, s) in stats if s == 200}
    deep = {"POST /predict", "POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer"}
    assert deep | {"PUT /admin/pin"} <= served  # the deep paths ran


@pytest.mark.slow
def test_fuzz_campaign_of_over_1000_requests(api: OpenApiSchema) -> None:
    stats = campaign(api, scale=40)
    print(_report(stats))
    assert sum(stats.values()) >= 1000
    assert not [s for (_, s) in stats if s >= 500]
