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


# --- the shared MobileFaceNet, converted, quantized and verified once per test run ------------------
#
# Embedding all 6,000 LFW pairs is most of the suite's time (24,000 forward passes per model), so
# the files below are made once and read by every test file that needs them; tests never write
# beside them.


@pytest.fixture(scope="session")
def real_converted(shared_model, shared_lfw, tmp_path_factory):
    """The shared MobileFaceNet at opset 11 with a dynamic batch, its equivalence gate run on 16 LFW faces."""
    from pipeline.stages.convert import convert

    out = tmp_path_factory.mktemp("mobilefacenet") / "mobilefacenet-opset11.onnx"
    return convert(shared_model, out, data=shared_lfw, dynamic_batch=True, samples=16)


@pytest.fixture(scope="session")
def real_int8(real_converted, shared_lfw):
    """That model quantized by the stage with the shipped recipe (INC, 200 calibration faces): its QuantizeResult."""
    from pipeline.recipe import default_recipe, with_overrides
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize

    recipe = with_overrides(default_recipe(), {"calibration.samples": 200})
    out = real_converted.output.parent / "int8" / "mobilefacenet-int8.onnx"
    return quantize(Int8Job.from_recipe(recipe, model=real_converted.output, calib=shared_lfw, out=out))


@pytest.fixture(scope="session")
def real_embedding_cache(request, tmp_path_factory) -> Path:
    """verify's fp32 embedding cache for the real model: pytest's cache directory, which survives between runs
    (a fresh clone pays once); without pytest's cache, a temporary directory."""
    store = getattr(request.config, "cache", None)
    if store is not None:
        return Path(store.mkdir("qpipe-verify-embeddings"))
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="session")
def real_lfw_verify(real_converted, real_int8, shared_lfw, real_embedding_cache, tmp_path_factory):
    """`qpipe verify` of the converted model and its recipe int8 on all 6,000 LFW pairs, as a user runs it.

    The CLI's result (exit code and output, asserted by the tests) and its report directory.
    """
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    int8 = real_int8
    rep = tmp_path_factory.mktemp("verify-lfw") / "rep"
    result = CliRunner().invoke(
        app,
        ["verify", "--fp32", str(real_converted.output), "--int8", str(int8.output), "--data", str(shared_lfw),
         "--report", str(rep), "--cache-dir", str(real_embedding_cache), "--rounds", "10", "-q",
         "--min-speedup", "0", "--max-accuracy-drop", "100"],
    )
    return {"cli": result, "report": rep, "fp32": real_converted.output, "int8": int8.output}
