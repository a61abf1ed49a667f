"""Security: the admin key (constant-time, off without one), no secrets in logs, and nothing in the project
unpickles untrusted data.

Tested elsewhere, referenced here:

- admin endpoints are off (404) without LCS_API_KEY, and need the right key (401 without, 403 wrong) in
  X-API-Key or Authorization: Bearer: tests/service/test_app.py `test_admin_is_off_without_an_api_key`,
  `test_pin_needs_the_right_key_and_pins_what_predict_serves`;
- request body limit (413, also streamed) and images per request (422, /predict and v2):
  tests/service/test_app.py, tests/service/test_hostile.py (lying Content-Length, chunked, real socket);
- the container runs as a non-root user, with nothing after USER running as root:
  tests/deploy/test_compose.py `test_dockerfile_is_multi_stage_small_and_non_root`;
- checkpoints load without pickle, and a pickle payload never runs: tests/lcs/test_checkpoint.py.
"""

from __future__ import annotations

import ast
import hmac
import logging
import time
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.service_support import (
    IMAGE,
    ROOT,
    TinyCheckpoint,
    free_port,
    make_settings,
    real_server,
    serve,
)

SECRET = "s3cret-Zq8vX2-do-not-log"
ZEROS = [[0] * IMAGE for _ in range(IMAGE)]


def test_the_api_key_is_compared_in_constant_time(structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # service.app calls hmac.compare_digest at request time
    with serve(make_settings(structured.path, api_key=SECRET)) as c:
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": "wrong"}).status_code == 403
        assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": SECRET[:-1]}).status_code == 403
        assert c.delete("/admin/pin", headers={"authorization": f"Bearer {SECRET}"}).status_code == 200
    assert calls == [(b"wrong", SECRET.encode()), (SECRET[:-1].encode(), SECRET.encode()), (SECRET.encode(),) * 2]


def test_the_secret_never_reaches_logs_answers_or_the_settings_repr(
    structured: TinyCheckpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level, from start-up on
    settings = make_settings(structured.path, api_key=SECRET, log_level="debug")
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert SECRET not in text
    answers = []
    with serve(settings) as c:
        for headers in (
            {"x-api-key": SECRET},
            {"x-api-key": SECRET + "x"},
            {"authorization": f"Bearer {SECRET}"},
            {"authorization": f"Bearer {SECRET[::-1]}"},
            {"authorization": f"Basic {SECRET}"},
        ):
            answers.append(c.put("/admin/pin", json={"alpha": 0.5}, headers=headers))
            answers.append(c.delete("/admin/pin", headers=headers))
        answers.append(c.put("/admin/pin", json={"alpha": "x", "key": SECRET}, headers={"x-api-key": SECRET}))
        for path in ("/model", "/controller", "/metrics", "/openapi.json", "/readyz"):
            answers.append(c.get(path))
    assert [a.status_code for a in answers[:10]] == [200, 200, 403, 403, 200, 200, 403, 403, 401, 401]
    for a in answers:
        assert SECRET not in a.text, a.request.url
    assert caplog.records  # something was logged (start-up at least), and none of it holds the secret
    assert SECRET not in caplog.text
    assert all(SECRET not in str(r.args) for r in caplog.records)


def test_the_secret_never_reaches_a_real_servers_output(structured: TinyCheckpoint, tmp_path: Path) -> None:
    """`python -m service` at debug level (uvicorn's logs included), with admin calls right and wrong."""
    env = {
        "LCS_API_KEY": SECRET,
        "LCS_LOG_LEVEL": "debug",
        # a Prometheus that refuses: the fleet source logs each failed query at debug level
        "LCS_PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}",
        "LCS_CONTROL_INTERVAL_SECONDS": "0.1",
    }
    with real_server(structured.path, tmp_path, **env) as server:
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": SECRET}).status_code == 200
            assert c.put("/admin/pin", json={"alpha": 0.5}, headers={"x-api-key": "nope"}).status_code == 403
            assert c.delete("/admin/pin", headers={"authorization": f"Bearer {SECRET}"}).status_code == 200
            assert c.post("/predict", json={"inputs": [ZEROS]}).status_code == 200
        time.sleep(0.5)  # a few control steps
        server.proc.terminate()
        server.proc.wait(30)
    log = server.log.read_text()
    assert "Application startup complete" in log and "DEBUG lcs.fleet" in log  # it did log, at debug level
    assert SECRET not in log


def test_settings_keep_the_key_secret_when_read_from_the_environment(
    structured: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LCS_API_KEY", SECRET)
    s = Settings(checkpoint=structured.path)
    assert s.api_key is not None and s.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(s) and SECRET not in repr(s.api_key) and SECRET not in f"{s.api_key}"


# -- nothing in the project unpickles untrusted data ----------------------------------------------------

SCANNED = ("lcs", "training", "service", "benchmarks", "scripts")
UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "_pickle.Unpickler",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pandas.read_pickle",
    "numpy.lib.format.read_array",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.unsafe_load_all",
    "torch.hub.load",
}
UNSAFE_MODULES = {"dill", "joblib", "cloudpickle", "shelve", "marshal", "jsonpickle"}  # importing them at all
# restricted unpicklers that may exist, each with its find_class allow-list: (file, class)
ALLOWED_UNPICKLERS = {("training/data.py", "_ArraysOnly")}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_sites(source: str, filename: str) -> list[str]:
    """Every place in `source` that could unpickle (or otherwise deserialise code from) untrusted data."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> what it refers to, from the module's imports
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")

    def resolve(node: ast.expr) -> str | None:
        name = _dotted(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    # YAML loaders that construct only plain data: PyYAML's safe ones and this module's subclasses of them
    safe_loaders = {"yaml.SafeLoader", "yaml.CSafeLoader"}
    safe_loaders |= {
        c.name
        for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef) and any(resolve(b) in safe_loaders for b in c.bases)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if resolve(base) in ("pickle.Unpickler", "_pickle.Unpickler"):
                    has_find_class = any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body)
                    if (filename, node.name) not in ALLOWED_UNPICKLERS or not has_find_class:
                        found.append(f"{filename}:{node.lineno}: class {node.name}(pickle.Unpickler)")
        if not isinstance(node, ast.Call):
            continue
        name = resolve(node.func)
        where = f"{filename}:{node.lineno}: {name}(...)"
        if name in UNSAFE_CALLS:
            found.append(where)
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(where + " without weights_only=True")
        elif name == "numpy.load" and _keyword(node, "allow_pickle") is not None:
            value = _keyword(node, "allow_pickle")
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(where + " with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or resolve(loader) not in safe_loaders:
                found.append(where + " without a SafeLoader")
    return found


def test_the_scanner_finds_every_unsafe_pattern_and_passes_the_safe_ones() -> None:
    unsafe = """
import pickle, dill
import pickle as pk
import numpy as np
import torch, yaml
from pickle import loads as l
from torch import load
from joblib import load as jl
pickle.load(f); pk.loads(b); l(b); load("m.pt"); torch.load("m.pt", weights_only=False)
np.load("a.npy", allow_pickle=True); yaml.load(s); yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s)
class Full(yaml.FullLoader):
    pass
yaml.load(s, Loader=Full)
class Mine(pickle.Unpickler):
    pass
pickle.Unpickler(f).load()
"""
    found = unpickling_sites(unsafe, "x.py")
    assert len(found) == 2 + 11 + 1, "\n".join(found)  # two imports, eleven calls, one class
    safe = """
import numpy as np, torch, yaml, json, pickle
torch.load("m.pt", weights_only=True); np.load("a.npy"); np.load("a.npy", allow_pickle=False)
yaml.safe_load(s); yaml.load(s, Loader=yaml.SafeLoader); json.loads(s); pickle.dumps(x)
class Strict(yaml.SafeLoader):
    pass
yaml.load(s, Loader=Strict)
class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name): ...
"""
    assert unpickling_sites(safe, "training/data.py") == []
    assert unpickling_sites(safe, "service/other.py") != []  # the restricted unpickler is allowed in one place


def test_nothing_in_the_project_unpickles_untrusted_data() -> None:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    found = [s for p in files for s in unpickling_sites(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, "unpickling untrusted data is code execution; use safetensors/JSON:\n" + "\n".join(found)
    # and the one restricted unpickler there is still allows nothing but array reconstruction
    from training.data import _ArraysOnly

    array_modules = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "_codecs"}
    assert {module for module, _ in _ArraysOnly.ALLOWED} <= array_modules
