"""Service test fixtures: tiny real checkpoints, one per compression kind, made once per session.

Helpers (apps, settings, polling) live in service_support.py; test modules import them from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.service.service_support import TinyCheckpoint, make_checkpoint


@pytest.fixture(autouse=True, scope="session")
def _no_lcs_env() -> Iterator[None]:
    """Settings read LCS_* variables; a developer's shell must not change what the tests see."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("LCS_"):
                mp.delenv(name)
        yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyCheckpoint]:
    """tiny_checkpoints(kind) -> that kind's checkpoint, made once per session on first use."""
    made: dict[str, TinyCheckpoint] = {}
    directory = tmp_path_factory.mktemp("checkpoints")

    def get(kind: str) -> TinyCheckpoint:
        if kind not in made:
            made[kind] = make_checkpoint(directory, kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def structured(tiny_checkpoints: Callable[[str], TinyCheckpoint]) -> TinyCheckpoint:
    return tiny_checkpoints("structured")
