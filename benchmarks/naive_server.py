"""The baseline for the HTTP benchmark: a plain FastAPI server running the same alpha = 1 model one
request at a time (no batching, no queue, no controller). Not part of the product.

    LCS_CHECKPOINT=models/structured_line.safetensors uvicorn benchmarks.naive_server:app --port 8001
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from lcs import checkpoint
from service.inputs import normaliser
from service.materialize import build, normalised_samples
from service.settings import BACKEND, Backend

torch.set_num_threads(int(os.environ.get("LCS_THREADS", "2")))
torch.set_flush_denormal(True)
_path = Path(os.environ.get("LCS_CHECKPOINT", "models/structured_line.safetensors"))
_model, _meta, _stored = checkpoint.load_with_samples(_path, named_by="LCS_CHECKPOINT")
_samples = normalised_samples(_stored, _meta.input)
_scale, _shift = normaliser(_meta.input)
_calib = None if _samples is None else _samples[0]
_backend = os.environ.get("LCS_BACKEND", BACKEND)  # what runs the float network: the service's setting, as it reads it
if _backend not in get_args(Backend):
    raise SystemExit(f"LCS_BACKEND={_backend}: expected one of {', '.join(get_args(Backend))}")
_compiled = build(_model, _meta, 1.0, samples=_calib, channels_last=True, backend=cast(Backend, _backend))
_lock = threading.Lock()
app = FastAPI()


class Body(BaseModel):
    inputs: list[list[Any]]


@app.post("/predict")
def predict(body: Body) -> dict[str, Any]:
    x = np.asarray(body.inputs, dtype=np.float32)
    if _calib is not None:
        x = x.reshape(-1, *_calib.shape[1:])
    with _lock:  # one request at a time
        probs = torch.softmax(_compiled(torch.from_numpy(x * _scale + _shift)), dim=1)
    top = probs.argmax(1).tolist()
    return {"predictions": [{"label": _meta.classes[i], "index": i} for i in top]}
