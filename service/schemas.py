"""Request and response bodies (pydantic), with the examples shown in the OpenAPI docs."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

PRESETS: dict[str, float] = {"best": 1.0, "high": 0.75, "balanced": 0.5, "fast": 0.25, "fastest": 0.0}
Preset = Literal["best", "high", "balanced", "fast", "fastest"]  # PRESETS' names (a test keeps them equal)


def _quality(value: object) -> object:
    """One message for a bad quality, naming both forms (pydantic would report each member of the union),
    with the value as the client wrote it (JSON: true, not Python's True)."""
    if isinstance(value, str) and value not in PRESETS:
        try:
            float(value)
            hint = "; send a number as a JSON number, not a string"
        except ValueError:
            hint = f"; use a number in [0, 1] or one of {list(PRESETS)}"
        raise ValueError(f"unknown preset {value[:40]!r}{hint}")
    if not isinstance(value, str) and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0
    ):
        raise ValueError(f"{json.dumps(value, default=str)[:40]} is not a number in [0, 1] or one of {list(PRESETS)}")
    return value


Quality = Annotated[Annotated[float, Field(ge=0.0, le=1.0)] | Preset, BeforeValidator(_quality)]


def _class_count(value: object) -> object:
    """One message for a bad classification count that says what to send (strict pydantic named only the type),
    with the value as the client wrote it. Null is unset, as binary_data's."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"{json.dumps(value, default=str)[:40]} is not a count of classes; send a whole JSON number, at least 1 "
            "(3: each image's top 3 classes)"
        )
    return value


ClassCount = Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_class_count)]

_EXAMPLE_IMAGE: list[Any] = [[0] * 28 for _ in range(28)]


class Hint(BaseModel):
    """How a request may be served: /predict takes these at the top of its body, OIP v2 in `parameters`.
    Strict: JSON true is not 1 and "50" is not 50; a client that sends the wrong type hears about it."""

    model_config = ConfigDict(strict=True)

    quality: Quality | None = Field(
        None,
        description="Preferred alpha, 0..1 (1 = most accurate) or a preset; the server never serves "
        "more accurately than this, and under load may serve less. Default: 1.",
    )
    min_quality: Quality | None = Field(
        None,
        description="Lowest acceptable alpha; if it cannot be met now the request is refused at once "
        "with 429, and Retry-After unless an operator's pin or the battery cap is what refuses it.",
    )
    deadline_ms: float | None = Field(
        None, gt=0, le=60_000, allow_inf_nan=False, description="Latency budget for this request."
    )


class PredictRequest(Hint):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"inputs": [_EXAMPLE_IMAGE], "quality": "balanced", "deadline_ms": 50}]},
    )

    # fail_fast: each item that is neither made two errors, 1.5 GiB and 10 s for a 1.5 MiB list of numbers
    inputs: list[list[Any] | str] = Field(
        fail_fast=True,
        description="Images: nested arrays of raw pixel values 0-255 in the model's input shape "
        "([H, W], [C, H, W] or [H, W, C]), or base64 PNG/JPEG strings.",
    )
    top_k: int | None = Field(
        None, ge=1, le=1000, description="How many classes to return per input (at most every class)."
    )


class ClassScore(BaseModel):
    label: str
    index: int
    probability: float


class Prediction(BaseModel):
    label: str
    index: int
    probability: float
    top: list[ClassScore]


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "predictions": [
                        {
                            "label": "Trouser",
                            "index": 1,
                            "probability": 0.98,
                            "top": [{"label": "Trouser", "index": 1, "probability": 0.98}],
                        }
                    ],
                    "model": "structured_line",
                    "alpha": 0.5,
                    "kind": "structured",
                    "level": 0.625,
                    "level_name": "width",
                    "accuracy": 91.2,
                    "queue_ms": 0.4,
                    "compute_ms": 1.9,
                    "batch_images": 3,
                    "request_id": "9f2c...",
                }
            ]
        }
    )

    predictions: list[Prediction]
    model: str
    alpha: float = Field(description="The alpha that served this request (1 = least compressed).")
    kind: str
    level: float = Field(description="Compression at that alpha: sparsity fraction, width fraction or bits.")
    level_name: str
    accuracy: float | None = Field(description="Test accuracy (%) measured for that alpha at training time.")
    queue_ms: float = Field(description="From the request's place in the queue to its batch's start.")
    compute_ms: float = Field(
        description="From its batch's start to the batch's results: the model, the hand-off to the inference "
        "thread and back, and the softmax; the same for every request of the batch."
    )
    batch_images: int = Field(description="Images in the batch that served it, this request's and others'.")
    request_id: str


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    alpha: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


class V2Tensor(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    shape: list[int] = Field(max_length=8, fail_fast=True)  # its product of 400 huge numbers took 13 s
    datatype: str
    data: list[Any] | None = Field(
        None, description="The values, flat; or none, with parameters.binary_data_size (binary extension)"
    )
    parameters: dict[str, Any] | None = None


class V2Parameters(Hint):
    """OIP v2 request parameters: the hint, the binary extension's, and any others a client sends (ignored)."""

    model_config = ConfigDict(extra="allow", strict=True)
    binary_data_output: bool = Field(
        False, description="Every output as binary data after the JSON (binary tensor extension), unless it says not."
    )


class V2OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    binary_data: bool | None = Field(
        None,
        description="This output as binary data after the JSON (binary tensor extension); unset: as asked by "
        "the request's binary_data_output.",
    )
    classification: ClassCount = Field(
        None,
        description="Classification extension (Triton's): each image's top `classification` classes (all of them "
        "where it is more) instead of the probabilities, as BYTES '<probability>:<index>:<label>', most probable "
        "first.",
    )


class V2Output(BaseModel):
    """An output a v2 request asks for."""

    model_config = ConfigDict(strict=True)
    name: str
    parameters: V2OutputParameters | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
                    "parameters": {"quality": 0.5},
                }
            ]
        },
    )
    id: str | None = None
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1)
    parameters: V2Parameters | None = None
    outputs: list[V2Output] | None = Field(None, max_length=8, fail_fast=True)

    @field_validator("id")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        """The answer echoes the id in its JSON, which is UTF-8; json.loads reads a lone surrogate escape
        ("\\ud800"), which UTF-8 cannot carry (the answer was a 500)."""
        if value is not None and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ValueError(
                    "holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send the id as UTF-8 text"
                ) from None
        return value


class V2ResponseOutput(BaseModel):
    name: str
    datatype: str = Field(description="FP32; BYTES where the output asked for classification.")
    shape: list[int] = Field(description="[N, classes]; with classification, [N, the classes returned].")
    data: list[float] | list[str] | None = Field(
        None,
        description="The values, flat (row-major): numbers, or with classification strings "
        "'<probability>:<index>:<label>'; absent when sent as binary data.",
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the bytes of this output after the JSON (binary tensor extension)."
    )


class V2InferResponse(BaseModel):
    """The JSON of an OIP v2 answer: alone (application/json), or followed by the outputs asked for as binary
    data (application/octet-stream, the JSON's length in the Inference-Header-Content-Length header)."""

    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] = Field(description="How the request was served, as /predict's body says it.")
    outputs: list[V2ResponseOutput]


class ErrorResponse(BaseModel):
    """Every error the service answers (4xx and 5xx) has this body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": "invalid input", "detail": "inputs[0]: shape [5, 5] does not match ...", "request_id": "9f2c"}
            ]
        }
    )

    error: str = Field(
        description="Short reason, e.g. 'invalid input' or 'overloaded'; on the OIP v2 paths followed by ': ' "
        "and the detail, as that protocol's error message."
    )
    detail: str = Field(description="What was wrong and what to do about it.")
    request_id: str | None = Field(None, description="The X-Request-ID of the request; quote it in a report.")
