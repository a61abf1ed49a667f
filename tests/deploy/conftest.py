"""Deploy test fixtures: a clean LCS_ environment and one tiny checkpoint per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.deploy.deploy_support import make_checkpoint


@pytest.fixture(autouse=True)
def _no_lcs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read LCS_* variables; a developer's shell must not change what the tests see."""
    for name in list(os.environ):
        if name.startswith("LCS_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny.safetensors")
