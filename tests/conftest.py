"""Shared fixtures: the real material in ../shared, skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "mobilefacenet-opset8.onnx"
SHARED_LFW = SHARED / "data" / "lfw.bin"
SHARED_RAW = SHARED / "data" / "lfw_raw"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real material not present: {path} (../shared is absent in a fresh clone; CI has it)")
    return path


@pytest.fixture(scope="session")
def shared_model() -> Path:
    return _need(SHARED_MODEL)


@pytest.fixture(scope="session")
def shared_lfw() -> Path:
    return _need(SHARED_LFW)


@pytest.fixture(scope="session")
def shared_raw() -> Path:
    return _need(SHARED_RAW)
