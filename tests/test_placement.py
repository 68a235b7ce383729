"""Speed-aware placement: candidate node groups, the choice (fastest within the accuracy target, with injected
timings and scores), what the int8 graph, the manifest and ``qpipe quantize`` say about each node."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from pipeline.accuracy.placement import AS_BUILT, Candidate, candidate_nodes, choose, node_placement, place
from pipeline.cli.app import app
from pipeline.core.files import sha256_file
from pipeline.recipe import default_recipe, with_overrides
from pipeline.stages.prelu import rewrite_prelu
from pipeline.stages.quantize.job import Int8Job
from pipeline.stages.quantize.stage import quantize
from tests.synthdata import face_images, face_model, synthetic_bin

SIZE = 32


def _recipe(**overrides):
    base = {
        "model.input.size": [SIZE, SIZE],
        "calibration.samples": 20,
        "quantization.engine": "ort",
        "quantization.calibration_method": "minmax",
        "quantization.recovery.eval_pairs": 100,
        "quantization.recovery.max_accuracy_drop": 1.0,
        "quantization.placement.rounds": 2,
        "quantization.placement.runs_per_round": 1,
        "quantization.placement.warmup": 0,
        "verify.batch": 32,
    }
    base.update(overrides)
    return with_overrides(default_recipe(), base)


@pytest.fixture(scope="module")
def prelu_model(tmp_path_factory) -> Path:
    """The synthetic face model with its PRelu rewritten as convert does: 1x1 depthwise branches, Relu, Add."""
    m = face_model(size=(SIZE, SIZE))
    rewrite_prelu(m)
    path = tmp_path_factory.mktemp("placement") / "prelu-rewritten.onnx"
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def pairs_bin(tmp_path_factory) -> Path:
    return synthetic_bin(tmp_path_factory.mktemp("placement-bin") / "pairs.bin", pairs=100, size=(SIZE, SIZE), seed=3)


def _depthwise(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]


# --- groups ---------------------------------------------------------------------------


def test_depthwise_candidate_keeps_every_depthwise_conv_and_the_islands_between_them(prelu_model: Path):
    m = onnx.load(str(prelu_model))
    dw = _depthwise(m)
    assert "conv2" in dw and len(dw) > 1, "the 3x3 depthwise conv and the PRelu branches"
    nodes = candidate_nodes(m, "depthwise_fp32", ["fc1"])
    assert set(dw) <= set(nodes) and "fc1" in nodes
    # A Relu or Add fed only by fp32 depthwise branches goes fp32 with them; the pointwise convs stay int8.
    by_name = {n.name: n for n in m.graph.node}
    merged = [n for n in nodes if by_name[n].op_type in ("Relu", "Add")]
    assert merged, "the rewritten PRelu's Relu and Add join the fp32 branches"
    assert not {"conv1", "conv3", "conv4"} & set(nodes)
    # Only the 1x1 branches: the 3x3 depthwise conv stays int8.
    ones = candidate_nodes(m, "depthwise1x1_fp32", [])
    assert "conv2" not in ones and set(dw) - {"conv2"} <= set(ones)
    # Everything but the pointwise/full convs and the Gemm.
    pw = candidate_nodes(m, "pointwise_only", [])
    assert not {"conv1", "conv3", "conv4", "fc1"} & set(pw) and "conv2" in pw and "residual4" in pw


# --- the choice -------------------------------------------------------------------------


def _cands(*rows):
    out = []
    for name, speedup in rows:
        out.append(Candidate(name, name, [], latency_ms=10 / speedup, speedup=speedup, speedup_iqr=(speedup, speedup)))
    return out


def test_choice_is_the_fastest_within_target_and_slower_ones_are_not_scored():
    cands = _cands((AS_BUILT, 1.1), ("a", 1.9), ("b", 1.5), ("c", 1.2))
    drops = {"a": 0.5, "b": 0.05, "c": 0.0}
    scored = []

    def score(c):
        scored.append(c.name)
        c.accuracy = {"drop": drops[c.name], "pairs": 600}
        c.within_target = drops[c.name] <= 0.1

    chosen = choose(cands, score)
    assert chosen.name == "b", "a is faster but outside the target: never chosen"
    assert scored == ["a", "b"]
    assert cands[3].within_target is None and cands[3].why_not_scored.startswith("not scored")


def test_choice_falls_back_to_the_int8_as_built_when_nothing_faster_is_within_target():
    cands = _cands((AS_BUILT, 0.9), ("a", 1.4))

    def score(c):
        c.accuracy, c.within_target = {"drop": 2.0, "pairs": 600}, False

    assert choose(cands, score).name == AS_BUILT


# --- the step on a real quantization, timings and scores injected ------------------------


def _fake_timer(latency: dict[str, float]):
    def timer(models, x, **kw):
        assert set(models) == set(latency), "fp32 and every candidate are timed in the same rounds"
        assert x.shape[0] == 1 and kw["rounds"] == 2
        return {k: [latency[k]] * kw["rounds"] for k in models}

    return timer


def _fake_scorer(drops: dict[str, float]):
    def scorer(path: Path):
        name = path.parent.name
        return {"drop": drops[name], "pairs": 100, "accuracy": 90.0, "accuracy_std": 1.0, "cosine_mean": 0.99, "cosine_min": 0.9}

    return scorer


def test_place_keeps_the_fastest_candidate_within_target_and_its_nodes_are_fp32_in_the_graph(tmp_path, prelu_model, pairs_bin):
    r = _recipe(**{"quantization.placement.candidates": ["depthwise_fp32", "pointwise_only"]})
    out = tmp_path / "q" / "int8.onnx"
    job = Int8Job.from_recipe(r, model=prelu_model, calib=pairs_bin, out=out)
    base = quantize(job)
    timer = _fake_timer({"fp32": 10.0, AS_BUILT: 9.0, "depthwise_fp32": 6.0, "pointwise_only": 5.0})
    res, pl = place(job, base=base, timer=timer, scorer=_fake_scorer({"depthwise_fp32": 0.5, "pointwise_only": 3.0}))
    assert pl.chosen == "depthwise_fp32" and pl.int8_pays
    assert pl.candidate("pointwise_only").within_target is False, "the fastest one is outside the 1-point target"
    assert abs(pl.candidate("depthwise_fp32").speedup - 10 / 6) < 1e-9
    # The file at out is the chosen candidate: its depthwise convs have no QLinear form.
    int8 = onnx.load(str(out))
    names = {n.name: n.op_type for n in int8.graph.node}
    fp32 = onnx.load(str(prelu_model))
    for n in _depthwise(fp32):
        assert names.get(n) == "Conv" and n + "_quant" not in names
    assert names.get("conv3_quant") == "QLinearConv"
    assert res.output == out and res.placement["chosen"] == "depthwise_fp32"
    assert res.record["recipe"]["quantization"]["nodes_to_exclude"] == pl.candidate("depthwise_fp32").nodes_fp32
    # Every named node says where it ended up and why.
    nodes = res.placement["nodes"]
    assert set(nodes) == {n.name for n in fp32.graph.node}
    assert nodes["conv2"]["placement"] == "fp32" and nodes["conv2"]["why"].startswith("placement: depthwise_fp32")
    assert nodes["conv3"]["placement"] == "int8"
    text = "\n".join(res.placement["summary"])
    assert "* depthwise_fp32" in text and "pointwise_only" in text and "OUTSIDE" in text and "ISA class" in text
    assert not list(out.parent.glob(".qpipe-*")), "no scratch left behind"


def test_place_says_so_when_no_int8_placement_beats_fp32(tmp_path, prelu_model, pairs_bin):
    r = _recipe(**{"quantization.placement.candidates": ["depthwise_fp32"]})
    out = tmp_path / "q" / "int8.onnx"
    job = Int8Job.from_recipe(r, model=prelu_model, calib=pairs_bin, out=out)
    base = quantize(job)
    before = out.read_bytes()
    timer = _fake_timer({"fp32": 5.0, AS_BUILT: 6.0, "depthwise_fp32": 5.5})
    res, pl = place(job, base=base, timer=timer, scorer=_fake_scorer({"depthwise_fp32": 0.0}))
    assert pl.chosen == "depthwise_fp32" and not pl.int8_pays and pl.candidate("depthwise_fp32").speedup < 1
    assert res.placement["int8_pays"] is False
    assert any("NO int8 placement measured faster than fp32" in line for line in res.placement["summary"])
    assert out.read_bytes() != before


def test_without_pairs_the_embedding_cosine_to_fp32_decides(tmp_path, prelu_model):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i, jpg in enumerate(face_images(24, size=(SIZE, SIZE), seed=5)):
        (faces / f"{i:03d}.jpg").write_bytes(jpg)
    r = _recipe(**{"quantization.placement.candidates": ["pointwise_only"], "quantization.placement.cosine_tolerance": 0.0})
    out = tmp_path / "q" / "int8.onnx"
    job = Int8Job.from_recipe(r, model=prelu_model, calib=faces, out=out)
    base = quantize(job)
    timer = _fake_timer({"fp32": 10.0, AS_BUILT: 9.0, "pointwise_only": 4.0})
    _, pl = place(job, base=base, timer=timer)
    assert pl.target["kind"] == "cosine"
    as_built, pw = pl.candidate(AS_BUILT), pl.candidate("pointwise_only")
    assert as_built.accuracy["faces"] == 20 and pw.accuracy is not None
    # More nodes in fp32, closer to fp32: accepted against the int8 as built with no tolerance.
    assert pw.within_target == (pw.accuracy["cosine_mean"] >= as_built.accuracy["cosine_mean"])
    assert pl.chosen == ("pointwise_only" if pw.within_target else AS_BUILT)


# --- end to end, real timing (structure only) ---------------------------------------------


def test_cli_quantize_with_placement_prints_each_candidate_and_writes_the_placement_into_the_manifest(tmp_path, prelu_model, pairs_bin):
    recipe = tmp_path / "recipe.yaml"
    r = _recipe(**{"quantization.placement.candidates": ["depthwise_fp32"]})
    recipe.write_text(json.dumps(r.resolved()))
    out = tmp_path / "q" / "int8.onnx"
    res = CliRunner().invoke(
        app, ["quantize", "--recipe", str(recipe), "--model", str(prelu_model), "--calib", str(pairs_bin), "--out", str(out), "--placement", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert "placement: batch-1 latency on" in res.output and "as_built" in res.output and "depthwise_fp32" in res.output
    assert "placement chosen:" in res.output
    manifest = json.loads((out.parent / "manifest.json").read_text())
    pl = manifest["placement"]
    assert pl["chosen"] in (AS_BUILT, "depthwise_fp32") and {c["name"] for c in pl["candidates"]} == {AS_BUILT, "depthwise_fp32"}
    assert all(c["speedup"] > 0 and c["latency_ms"] > 0 for c in pl["candidates"])
    assert pl["nodes"]["conv3"]["placement"] == "int8"
    # The manifest describes the model at out: the chosen candidate's exclusions, its graph.
    chosen = next(c for c in pl["candidates"] if c["name"] == pl["chosen"])
    assert manifest["recipe"]["quantization"]["nodes_to_exclude"] == chosen["nodes_fp32"]
    placed = node_placement(onnx.load(str(prelu_model)), onnx.load(str(out)))
    assert {k for k, v in placed.items() if v == "fp32"} == set(pl["nodes_fp32"])


def test_no_placement_flag_leaves_the_manifest_without_a_placement(tmp_path, prelu_model, pairs_bin):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(_recipe(**{"quantization.placement.enabled": True}).resolved()))
    out = tmp_path / "q" / "int8.onnx"
    res = CliRunner().invoke(
        app, ["quantize", "--recipe", str(recipe), "--model", str(prelu_model), "--calib", str(pairs_bin), "--out", str(out), "--no-placement", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert "placement" not in json.loads((out.parent / "manifest.json").read_text())
    assert "placement:" not in res.output


def test_after_recovery_the_manifest_and_recovery_json_say_where_each_node_ended_up(tmp_path, prelu_model, pairs_bin, monkeypatch):
    import pipeline.accuracy.placement as placement
    from pipeline.build.int8 import build_int8

    def timer(models, x, **kw):
        latency = {"fp32": 10.0, AS_BUILT: 8.0, "depthwise_fp32": 5.0}
        return {k: [latency[k]] * kw["rounds"] for k in models}

    monkeypatch.setattr(placement, "time_models", timer)
    r = _recipe(**{
        "quantization.recovery.enabled": True, "quantization.recovery.max_accuracy_drop": 50.0,
        "quantization.placement.enabled": True, "quantization.placement.candidates": ["depthwise_fp32"],
        "verify.rounds": 2, "verify.warmup": 0, "verify.runs_per_round": 1,
    })
    out = tmp_path / "q" / "int8.onnx"
    res = build_int8(Int8Job.from_recipe(r, model=prelu_model, calib=pairs_bin, out=out))
    assert res.recovery["within_target"] and res.placement["chosen"] == "depthwise_fp32"
    as_built = next(c for c in res.placement["candidates"] if c["name"] == AS_BUILT)
    assert as_built["accuracy"]["by"] == "recovery", "recovery's score of the int8 as built is reused, not measured again"
    manifest = json.loads(res.manifest.read_text())
    report = json.loads((out.parent / "recovery.json").read_text())
    for section in (manifest["placement"], report["placement"]):
        assert section["nodes"]["conv2"]["placement"] == "fp32" and section["nodes"]["conv2"]["why"].startswith("placement: depthwise_fp32")
        assert section["nodes"]["conv3"]["placement"] == "int8"
    assert manifest["recovery"]["within_target"] is True
    assert manifest["files"]["int8"]["path"] == str(out) and manifest["files"]["int8"]["sha256"] == sha256_file(out)
