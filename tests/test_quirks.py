"""Face models as other projects export them, through the real command line end to end.

Each small model carries one quirk: a graph input a node also produces, a graph
input nothing reads, int8 weights behind DequantizeLinear (per-tensor,
per-channel, blocked), stale recorded shapes, a 112x96 input (a centre crop of
the aligned 112x112 face) and a fixed batch of one. Each goes through
``qpipe convert``, ``qpipe quantize`` (both engines, with and without
``--recover``) and ``qpipe verify`` and must exit 0; the converted model must
give the source graph's embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.eval.protocol import cosine_rows
from pipeline.recipe import InputSpec
from pipeline.runtime import graph as onnxutil
from tests.synthdata import INPUT_NAME, OUTPUT_NAME, face_model, synthetic_bin

SIZE = 32
WIDE = (112, 96)
# Conv and Gemm weights of face_model: the ones a DequantizeLinear distribution stores as int8.
WEIGHTS = ("conv1_w", "conv2_w", "conv3_w", "conv4_w", "fc1_w")


# --- the quirky models ----------------------------------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def input_also_produced(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lists ``relu1`` (a PRelu output) among the graph inputs as well, as some published exports do."""
    m = _copy(model)
    m.graph.input.append(helper.make_tensor_value_info("relu1", TensorProto.FLOAT, [1, 8, SIZE // 2, SIZE // 2]))
    return m


def unused_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """A first graph input that no node reads (so it is the one a naive "first input" lookup takes)."""
    m = _copy(model)
    inputs = [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1]), *m.graph.input]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    return m


def stale_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Recorded shapes left over from another input size: they disagree with shape inference."""
    m = _copy(model)
    m.graph.value_info.extend(
        [
            helper.make_tensor_value_info("conv1", TensorProto.FLOAT, [1, 8, 5, 5]),
            helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 8, 8]),
        ]
    )
    return m


def _int8(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """int8 data, scale, zero point and DequantizeLinear attributes for ``w``, distributed ``kind``-wise."""
    if kind == "per-tensor":
        zp = np.array(3, np.int8)
        scale = np.array(np.abs(w).max() / 124, np.float32)
        attrs: dict = {}
        bzp, bscale = zp, scale
    elif kind == "per-channel":
        zp = rng.integers(-4, 5, w.shape[0]).astype(np.int8)
        scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 123).astype(np.float32)
        attrs = {"axis": 0}
        shape = [-1] + [1] * (w.ndim - 1)
        bzp, bscale = zp.reshape(shape), scale.reshape(shape)
    else:  # blocked along axis 1, opset 21
        block = 4 if w.ndim == 4 else 32
        blocks = -(-w.shape[1] // block)
        pad = blocks * block - w.shape[1]
        padded = np.pad(w, [(0, 0), (0, pad)] + [(0, 0)] * (w.ndim - 2))
        grouped = padded.reshape(w.shape[0], blocks, block, *w.shape[2:])
        scale = (np.abs(grouped).max(axis=2) / 123 + 1e-8).astype(np.float32)
        zp = rng.integers(-4, 5, scale.shape).astype(np.int8)
        attrs = {"axis": 1, "block_size": block}
        bscale = np.repeat(scale, block, axis=1)[:, : w.shape[1]]
        bzp = np.repeat(zp, block, axis=1)[:, : w.shape[1]]
    q = np.clip(np.round(w / bscale) + bzp, -128, 127).astype(np.int8)
    return q, scale, zp, attrs


def dequantize_linear(kind: str, *, seed: int = 0) -> onnx.ModelProto:
    """face_model with its Conv and Gemm weights stored as int8 behind a DequantizeLinear each."""
    opset, ir = (21, 10) if kind == "blocked" else (13, 7)
    m = face_model(size=(SIZE, SIZE), opset=opset, ir_version=ir, seed=seed)
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for name in WEIGHTS:
        w = numpy_helper.to_array(inits[name])
        q, scale, zp, attrs = _int8(w, kind, rng)
        inits[name].CopyFrom(numpy_helper.from_array(q, f"{name}_int8"))
        m.graph.initializer.extend([numpy_helper.from_array(scale, f"{name}_scale"), numpy_helper.from_array(zp, f"{name}_zp")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zp"], [name], name=f"{name}_dq", **attrs))
    all_nodes = nodes + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(all_nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def _plain() -> onnx.ModelProto:
    return face_model(size=(SIZE, SIZE))


# name -> (builder, what `convert` must say it repaired)
QUIRKS: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "input-also-produced": (lambda: input_also_produced(face_model(size=(SIZE, SIZE), dynamic_batch=False)),
                            r"graph input 'relu1' is also the output of node 'prelu1' \(op PRelu\): removed from the graph inputs"),
    "unused-input": (lambda: unused_input(_plain()), r"graph input 'mask' is read by no node: removed from the graph inputs"),
    "dq-per-tensor": (lambda: dequantize_linear("per-tensor"), r"folded 5 weight DequantizeLinear node\(s\) into fp32 initializers .*5 per-tensor int8"),
    "dq-per-channel": (lambda: dequantize_linear("per-channel"), r"folded 5 weight DequantizeLinear .*5 per-channel int8"),
    "dq-blocked": (lambda: dequantize_linear("blocked"), r"folded 5 weight DequantizeLinear .*5 blocked int8"),
    "stale-value-info": (lambda: stale_value_info(_plain()), r"dropped 2 recorded intermediate shape\(s\), 2 of them disagreeing .*'conv1' recorded \[1, 8, 5, 5\], inferred \[.*, 8, 16, 16\]"),
    "112x96": (lambda: face_model(size=WIDE, width=4), r"already at opset 11"),
    "static-batch": (lambda: face_model(size=(SIZE, SIZE), dynamic_batch=False), r"already at opset 11"),
}


# --- material and the command line --------------------------------------------------------------------


def _recipe_text(size: tuple[int, int], crop: list[int] | None = None) -> str:
    crop_text = f", crop: {crop}" if crop else ""
    return (
        "name: quirks\n"
        "model:\n"
        "  urls: [m.onnx]\n"
        f"  input: {{size: [{size[0]}, {size[1]}]{crop_text}}}\n"
        "calibration: {samples: 8}\n"
        "quantization:\n"
        "  recovery: {eval_pairs: 20, sensitivity_samples: 4, max_fp32_nodes: 1}\n"
        "verify: {warmup: 1, rounds: 2, runs_per_round: 1, batch: 4, throughput_batch: 2}\n"
        "gate: {max_accuracy_drop: 100.0, min_speedup: 0.0}\n"
    )


@pytest.fixture(scope="module")
def mat(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("quirks")
    m = SimpleNamespace(dir=d)
    m.faces = synthetic_bin(d / "faces.bin", pairs=10, size=(SIZE, SIZE))
    m.wide_faces = synthetic_bin(d / "wide.bin", pairs=10, size=(112, 112))  # aligned 112x112 faces
    m.recipe = d / "r.yaml"
    m.recipe.write_text(_recipe_text((SIZE, SIZE)))
    m.wide_recipe = d / "wide.yaml"
    m.wide_recipe.write_text(_recipe_text(WIDE, [0, 0, 8, 8]))
    m.models = {}
    for name, (build, _) in QUIRKS.items():
        path = d / f"{name}.onnx"
        onnx.save(build(), str(path))
        m.models[name] = path
    return m


@pytest.fixture(scope="module", autouse=True)
def _command_built_once() -> Iterator[None]:
    # typer rebuilds the click command from the function signatures on every invoke.
    import typer.main
    import typer.testing

    command = typer.main.get_command(app)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(typer.testing, "_get_command", lambda a: command if a is app else typer.main.get_command(a))
        yield


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # INC writes nc_workspace/ into the working directory


def cli(*args: object):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"qpipe {' '.join(map(str, args))}\nexit {r.exit_code}\n{r.stdout}\n{r.stderr}\n{r.exception!r}"
    assert "Traceback" not in r.stdout + r.stderr
    return r


def _spec_for(name: str) -> InputSpec:
    return InputSpec(size=list(WIDE), crop=[0, 0, 8, 8]) if name == "112x96" else InputSpec(size=[SIZE, SIZE])


def _material(mat: SimpleNamespace, name: str) -> tuple[Path, Path]:
    """(recipe, .bin) for the quirk ``name``."""
    return (mat.wide_recipe, mat.wide_faces) if name == "112x96" else (mat.recipe, mat.faces)


def _faces(mat: SimpleNamespace, name: str, n: int = 6) -> np.ndarray:
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    _, data = _material(mat, name)
    return preprocess(read_bin(data).decode_many(range(n)), _spec_for(name))


def _embed(model: Path | onnx.ModelProto, x: np.ndarray, *, feeds: dict[str, np.ndarray] | None = None) -> np.ndarray:
    from pipeline.runtime.session import session

    sess = session(model)
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 1], **(feeds or {})})[0] for i in range(len(x))]
    return np.concatenate(out)


def _source_embeddings(mat: SimpleNamespace, name: str, x: np.ndarray) -> np.ndarray:
    """What the source graph computes for ``x``, from a runtime that loads it as it is."""
    src = mat.models[name]
    if name == "input-also-produced":
        # onnxruntime refuses the duplicate definition; OpenCV (and the repaired graph) take the node's value,
        # which is what the graph without the extra input computes.
        return _embed(face_model(size=(SIZE, SIZE), dynamic_batch=False), x)
    if name == "unused-input":
        return _embed(src, x, feeds={"mask": np.zeros((1, 1), np.float32)})
    if name == "dq-blocked":
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(str(src))
        return np.concatenate([ref.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
    return _embed(src, x)


# --- convert --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(mat, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every quirk converted by `qpipe convert` (the static-batch model with --static-batch): (model, stdout)."""
    out = tmp_path_factory.mktemp("converted")
    done = {}
    for name, src in mat.models.items():
        recipe, data = _material(mat, name)
        dst = out / f"{name}.onnx"
        extra = ["--static-batch"] if name == "static-batch" else []
        r = cli("convert", "-m", src, "-o", dst, "-r", recipe, "--data", data, "--samples", 4, *extra, "-q")
        done[name] = (dst, r.stdout)
    return done


@pytest.mark.parametrize("name", list(QUIRKS))
def test_convert_repairs_the_quirk_and_keeps_the_source_embeddings(mat, converted, name: str):
    dst, stdout = converted[name]
    assert re.search(r"^repaired: " + QUIRKS[name][1], stdout, re.M), stdout
    worst = float(re.search(r"worst cosine ([0-9.]+)", stdout).group(1))
    assert worst >= 0.99999, stdout
    model = onnx.load(str(dst))
    # Strict shape inference (what stops Intel Neural Compressor on stale shapes) and the full checker pass.
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in onnxutil.graph_inputs(model)] == [INPUT_NAME]
    assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    batch = onnxutil.dims(model.graph.input[0])[0]
    assert batch == 1 if name == "static-batch" else isinstance(batch, str), batch
    x = _faces(mat, name)
    cos = cosine_rows(_source_embeddings(mat, name, x), _embed(dst, x))
    assert cos.min() >= 0.99999, cos


@pytest.mark.parametrize("kind", ["per-tensor", "per-channel", "blocked"])
def test_folded_weights_are_exactly_what_the_dequantize_nodes_compute(mat, converted, kind: str):
    from onnx.reference import ReferenceEvaluator

    from pipeline.runtime.session import session

    src = onnx.load(str(mat.models[f"dq-{kind}"]))
    inits = {t.name: t for t in src.graph.initializer}
    dq = [n for n in src.graph.node if n.op_type == "DequantizeLinear"]
    probe = helper.make_graph(
        dq, "dq", [], [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in dq],
        initializer=[inits[i] for n in dq for i in n.input],
    )
    probe_model = helper.make_model(probe, opset_imports=list(src.opset_import))
    probe_model.ir_version = src.ir_version
    want = session(probe_model, optimization="disabled").run(None, {})
    folded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(converted[f"dq-{kind}"][0])).graph.initializer}
    for n, w in zip(dq, want):
        np.testing.assert_array_equal(folded[n.output[0]], w, err_msg=n.output[0])
    if kind == "blocked":  # onnxruntime and onnx's reference implementation agree on the blocked form too
        for n, w in zip(dq, ReferenceEvaluator(probe_model).run(None, {})):
            np.testing.assert_array_equal(folded[n.output[0]], w, err_msg=n.output[0])


def test_a_112x96_model_sees_the_centre_columns_of_the_aligned_face(mat, converted):
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    faces = read_bin(mat.wide_faces).decode_many(range(2))
    x = preprocess(faces, InputSpec(size=list(WIDE), crop=[0, 0, 8, 8]), flip=True)
    # No resampling: exactly columns 8..103 of the 112x112 face, mirrored for the flipped view.
    want = faces[:, :, 8:104, :][:, :, ::-1, :].transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(x, want)


# --- quantize and verify ----------------------------------------------------------------------------

# (quirk, engine, recover): every quirk through both engines, each with recovery on one of them;
# the fixed batch (which every stage that batches embeddings must handle) through all four.
QUANTIZE_CASES = [
    ("input-also-produced", "ort", False),
    ("input-also-produced", "inc", True),
    ("unused-input", "inc", False),
    ("unused-input", "ort", True),
    ("dq-per-tensor", "ort", False),
    ("dq-per-tensor", "inc", True),
    ("dq-per-channel", "inc", False),
    ("dq-per-channel", "ort", True),
    ("dq-blocked", "inc", False),
    ("dq-blocked", "ort", True),
    ("stale-value-info", "inc", False),
    ("stale-value-info", "ort", True),
    ("112x96", "inc", False),
    ("112x96", "ort", True),
    ("static-batch", "ort", False),
    ("static-batch", "ort", True),
    ("static-batch", "inc", False),
    ("static-batch", "inc", True),
]


@pytest.mark.parametrize("name, engine, recover", QUANTIZE_CASES, ids=[f"{n}-{e}{'-recover' if r else ''}" for n, e, r in QUANTIZE_CASES])
def test_quantize_and_verify_exit_0_on_the_converted_model(mat, converted, tmp_path: Path, name: str, engine: str, recover: bool):
    fp32 = converted[name][0]
    recipe, data = _material(mat, name)
    int8 = tmp_path / "q" / "int8.onnx"
    cli("quantize", "-r", recipe, "-m", fp32, "--calib", data, "-o", int8, "--engine", engine,
        "--recover" if recover else "--no-recover", "-q")
    manifest = json.loads((int8.parent / "manifest.json").read_text())
    assert bool(manifest.get("recovery")) == recover
    x = _faces(mat, name, 4)
    cos = cosine_rows(_embed(fp32, x), _embed(int8, x))
    assert np.isfinite(cos).all() and cos.min() > 0.5, cos  # a working int8 of this model, not noise
    r = cli("verify", "-r", recipe, "--fp32", fp32, "--int8", int8, "--data", data, "--json", "-q")
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert report["gate"]["passed"] is True, report["gate"]


def test_diagnose_runs_on_the_fixed_batch_model(mat, converted, tmp_path: Path):
    cli("diagnose", "-r", mat.recipe, "--fp32", converted["static-batch"][0], "--calib", mat.faces,
        "--samples", 4, "--alone-only", "--report", tmp_path / "diag", "-q")
    assert (tmp_path / "diag" / "diagnose.json").is_file()


PLANTED_RECIPE = """\
name: planted
model:
  urls: [m.onnx]
  input: {size: [32, 32]}
calibration: {samples: 60}
quantization:
  engine: inc
  calibration_method: minmax
  recovery: {max_accuracy_drop: 1.0, eval_pairs: 200, sensitivity_samples: 16}
verify: {warmup: 1, rounds: 2, runs_per_round: 1, batch: 8, throughput_batch: 2}
gate: {max_accuracy_drop: 1.0, min_speedup: 0.0}
"""


# The planted near-dead channel's bias overflows int32 in INC's quantizer (the defect recovery repairs).
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_recovery_repairs_a_fixed_batch_model_that_misses_the_target(tmp_path: Path):
    # The planted model's int8 misses the target, so recovery measures, diagnoses and repairs it:
    # every embedding it computes goes through a model that takes one image at a time.
    from tests.twin import planted_model

    src, fp32, int8 = tmp_path / "planted.onnx", tmp_path / "fp32.onnx", tmp_path / "q" / "int8.onnx"
    planted_model(src, batch=1)
    pairs = synthetic_bin(tmp_path / "pairs.bin", pairs=200, seed=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(PLANTED_RECIPE)
    cli("convert", "-m", src, "-o", fp32, "-r", recipe, "--static-batch", "-q")
    assert onnxutil.dims(onnx.load(str(fp32)).graph.input[0])[0] == 1
    cli("quantize", "-r", recipe, "-m", fp32, "--calib", pairs, "-o", int8, "--recover", "-q")
    rec = json.loads((int8.parent / "recovery.json").read_text())
    assert not rec["attempts"][0]["within_target"] and rec["within_target"], rec["attempts"]


def test_crop_that_leaves_nothing_or_is_not_four_margins_is_a_user_error(mat, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    for crop, message in (("[0, 0, 56, 56]", r"crop \[0, 0, 56, 56\] leaves nothing of a 112x112 face"), ("[8, 8]", r"model.input.crop: .*four")):
        bad.write_text(_recipe_text(WIDE).replace("size: [112, 96]", f"size: [112, 96], crop: {crop}"))
        r = CliRunner().invoke(app, ["convert", "-m", str(mat.models["112x96"]), "-o", str(tmp_path / "x.onnx"), "-r", str(bad),
                                     "--data", str(mat.wide_faces), "-q"])
        assert r.exit_code == 2 and re.search(message, r.stderr), r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "x.onnx").exists()


def test_gate_images_without_data_are_cut_to_the_model_size_without_resampling(mat, tmp_path: Path, monkeypatch):
    import cv2

    from pipeline.stages.convert import convert

    def resampled(*args, **kwargs):
        raise AssertionError("the crop should leave the model's input size, with nothing to resize")

    monkeypatch.setattr(cv2, "resize", resampled)
    res = convert(mat.models["112x96"], tmp_path / "o.onnx", input_spec=_spec_for("112x96"), samples=2)
    assert res.sample_source == "seeded random" and res.worst_cosine >= 0.99999
