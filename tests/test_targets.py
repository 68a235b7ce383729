"""CPU targets: ISA class detection, the per-class speed threshold, and the CI matrix file.

The class is injected (flags or $QPIPE_CPU_CLASS), never the machine's, so the
same test passes on any CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import ci
from pipeline.build import targets as tg
from pipeline.cli.app import app
from pipeline.core.environment import CPU_CLASS_ENV, ISA_CLASSES, classes_from_flags, detect_cpu_class, speed_threshold
from pipeline.core.errors import UserError
from pipeline.recipe import GateSection, InputSpec, VerifySection, load_recipe, parse_recipe, with_overrides
from pipeline.stages.verify import verify
from tests.synthdata import face_model, synthetic_bin

ROOT = Path(__file__).resolve().parents[1]

# Flags of real CPUs (as /proc/cpuinfo spells them), trimmed to a few neighbours of the deciding ones.
ZEN3 = ["sse4_2", "avx", "avx2", "fma", "bmi2"]
CASCADE_LAKE = ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
ALDER_LAKE = ["avx2", "avx_vnni"]
SAPPHIRE_RAPIDS = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "amx_int8"]
GRAVITON = ["fp", "asimd", "asimddp", "sve"]

TABLE = {"avx512_vnni": 1.8, "avx2": 1.1}


def _cpu(flags):
    return detect_cpu_class(flags, env={})


# --- detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,classes",
    [
        (ZEN3, ("avx2",)),
        (CASCADE_LAKE, ("avx512_vnni", "avx2")),
        (ALDER_LAKE, ("avx_vnni", "avx2")),
        (SAPPHIRE_RAPIDS, ("amx", "avx512_vnni", "avx_vnni", "avx2")),
        (GRAVITON, ()),
        (["avx2", "amx_tile"], ("avx2",)),  # AMX needs its int8 unit too
    ],
)
def test_classes_come_from_the_cpuinfo_flags_most_capable_first(flags, classes):
    cpu = _cpu(flags)
    assert cpu.classes == classes
    assert cpu.detected == (classes[0] if classes else None)
    assert cpu.source == "/proc/cpuinfo"
    if classes:
        assert classes[0].split("_")[0] in cpu.evidence()


def test_the_environment_variable_replaces_the_cpu_and_a_bad_value_is_a_user_error():
    cpu = detect_cpu_class(ZEN3, env={CPU_CLASS_ENV: "avx512_vnni"})
    assert cpu.detected == "avx512_vnni" and cpu.source == CPU_CLASS_ENV and "avx2" in cpu.classes
    assert detect_cpu_class(SAPPHIRE_RAPIDS, env={CPU_CLASS_ENV: "none"}).classes == ()
    with pytest.raises(UserError, match="not an ISA class"):
        detect_cpu_class(ZEN3, env={CPU_CLASS_ENV: "avx9000"})


def test_the_class_is_recorded_in_the_environment_facts(monkeypatch):
    from pipeline.core.environment import environment

    monkeypatch.setenv(CPU_CLASS_ENV, "amx")
    monkeypatch.setenv("QPIPE_TARGET", "spr-runner")
    env = environment()
    assert env["cpu"]["isa_class"]["detected"] == "amx" and env["target"] == "spr-runner"


# --- which threshold applies ----------------------------------------------------------


def test_without_a_table_min_speedup_applies_on_every_cpu():
    for flags in (ZEN3, SAPPHIRE_RAPIDS, GRAVITON):
        t = speed_threshold(1.3, None, _cpu(flags))
        assert t.min_speedup == 1.3 and t.applied_class is None


def test_the_detected_class_picks_its_threshold_and_says_why():
    t = speed_threshold(1.0, TABLE, _cpu(CASCADE_LAKE))
    assert (t.min_speedup, t.applied_class) == (1.8, "avx512_vnni")
    assert "avx512_vnni" in t.why and "flags avx512_vnni" in t.why
    assert speed_threshold(1.0, TABLE, _cpu(ZEN3)).min_speedup == 1.1


def test_a_class_the_table_does_not_name_falls_back_to_the_best_named_class_the_cpu_has():
    # Sapphire Rapids (amx) under a table without amx: its VNNI figure; Alder Lake (avx_vnni): the avx2 one.
    spr = speed_threshold(1.0, TABLE, _cpu(SAPPHIRE_RAPIDS))
    assert (spr.min_speedup, spr.applied_class, spr.cpu.detected) == (1.8, "avx512_vnni", "amx")
    assert "table names" in spr.why
    assert speed_threshold(1.0, TABLE, _cpu(ALDER_LAKE)).applied_class == "avx2"


def test_a_cpu_in_no_named_class_is_an_error_unless_the_table_has_a_default():
    with pytest.raises(UserError, match="none of the classes.*default"):
        speed_threshold(1.0, TABLE, _cpu(GRAVITON))
    with pytest.raises(UserError, match="none of the classes"):
        speed_threshold(1.0, {"avx512_vnni": 2.0}, _cpu(ZEN3))
    t = speed_threshold(1.0, {**TABLE, "default": 0.9}, _cpu(GRAVITON))
    assert (t.min_speedup, t.applied_class) == (0.9, "default")


def test_recipe_rejects_unknown_classes_and_an_unused_min_speedup():
    base = {"name": "x", "model": {"urls": ["m.onnx"]}}
    with pytest.raises(UserError, match="min_speedup_by_class.*avx3"):
        parse_recipe({**base, "gate": {"min_speedup_by_class": {"avx3": 1.0}}})
    with pytest.raises(UserError, match="put it in the table as `default`"):
        parse_recipe({**base, "gate": {"min_speedup": 1.4, "min_speedup_by_class": {"avx2": 1.0}}})
    r = parse_recipe({**base, "gate": {"min_speedup_by_class": {"avx2": 1.2, "default": 1}}})
    assert r.gate.speed_threshold(_cpu(ZEN3)).min_speedup == 1.2
    # The command line's --min-speedup applies on every CPU: it clears the table.
    o = with_overrides(r, {"gate.min_speedup": 3.0, "gate.min_speedup_by_class": {}})
    assert o.gate.speed_threshold(_cpu(CASCADE_LAKE)).min_speedup == 3.0


def test_shipped_prelu_recipe_gates_per_class():
    r = load_recipe(ROOT / "recipes" / "mobilefacenet512-prelu-local.yaml")
    assert r.model.input.name == "input" and r.model.input.scale == "mean_std"
    assert set(r.gate.min_speedup_by_class) <= set(ISA_CLASSES)
    assert r.gate.speed_threshold(_cpu(CASCADE_LAKE)).min_speedup > r.gate.speed_threshold(_cpu(ZEN3)).min_speedup


# --- the gate, end to end on a tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.test_verify import _ort_int8
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess
    import numpy as np

    d = tmp_path_factory.mktemp("targets")
    fp32, lfw = d / "fp32.onnx", d / "lfw.bin"
    face_model(fp32, seed=0)
    synthetic_bin(lfw, pairs=20, seed=0)
    calib = preprocess(read_bin(lfw).decode_many(np.arange(8)), InputSpec(size=[32, 32]))
    return {"fp32": fp32, "int8": _ort_int8(fp32, d / "int8.onnx", calib), "lfw": lfw, "dir": d}


# Any real speedup is above 0.001x and below 1000x: the class alone decides the verdict.
PER_CLASS = {"avx2": 0.001, "avx512_vnni": 1000.0}


def _verify(tiny, gate):
    return verify(
        tiny["fp32"], tiny["int8"], [tiny["lfw"]], input_spec=InputSpec(size=[32, 32]),
        verify=VerifySection(rounds=2, warmup=1, runs_per_round=1, throughput_batch=2, batch=8), gate=gate,
    )


def test_one_recipe_passes_on_one_class_and_fails_on_another(tiny, monkeypatch):
    gate = GateSection(max_accuracy_drop=100.0, min_speedup_by_class=PER_CLASS)
    monkeypatch.setenv(CPU_CLASS_ENV, "avx2")
    ok = _verify(tiny, gate)
    assert ok.passed and ok.gate["min_speedup"] == 0.001
    assert ok.gate["cpu_class"]["detected"] == "avx2" and ok.gate["cpu_class"]["threshold_class"] == "avx2"
    monkeypatch.setenv(CPU_CLASS_ENV, "avx512_vnni")
    bad = _verify(tiny, gate)
    assert not bad.passed and bad.gate["min_speedup"] == 1000.0
    (reason,) = bad.gate["reasons"]
    assert "below the required 1000.00x" in reason and "avx512_vnni" in reason and CPU_CLASS_ENV in reason
    # The report records the class decision and the recipe's whole table.
    d = bad.to_dict()
    assert d["gate"]["cpu_class"]["min_speedup"] == 1000.0 and d["settings"]["gate"]["min_speedup_by_class"] == PER_CLASS
    assert d["environment"]["cpu"]["isa_class"]["detected"] == "avx512_vnni"
    from pipeline.stages.report import write_reports

    write_reports(bad, tiny["dir"] / "rep")
    assert "Speed threshold: CPU class avx512_vnni" in (tiny["dir"] / "rep" / "report.md").read_text()


def _recipe_file(tiny, gate_yaml: str) -> Path:
    p = tiny["dir"] / "r.yaml"
    p.write_text(
        "name: t\nmodel:\n  urls: [fp32.onnx]\n  input: {size: [32, 32]}\n"
        "verify: {rounds: 2, warmup: 1, runs_per_round: 1, throughput_batch: 2, batch: 8}\n" + gate_yaml
    )
    return p


def _cli(tiny, recipe, *extra, cls):
    args = ["verify", "--recipe", str(recipe), "--fp32", str(tiny["fp32"]), "--int8", str(tiny["int8"]), "--data", str(tiny["lfw"]), "-q", *extra]
    return CliRunner().invoke(app, args, env={CPU_CLASS_ENV: cls})


def test_cli_exit_codes_per_class_and_for_a_cpu_in_no_class(tiny):
    recipe = _recipe_file(tiny, "gate: {max_accuracy_drop: 100.0, min_speedup_by_class: {avx2: 0.001, avx512_vnni: 1000.0}}\n")
    assert _cli(tiny, recipe, cls="avx2").exit_code == 0
    r = _cli(tiny, recipe, cls="avx512_vnni")
    assert r.exit_code == 1 and "gate failed" in r.stderr and "avx512_vnni" in r.stderr
    r = _cli(tiny, recipe, cls="none")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("qpipe: error: the measuring CPU is in none of the classes") and "default" in r.stderr
    # --min-speedup replaces the table on every CPU.
    assert _cli(tiny, recipe, "--min-speedup", "0.001", cls="avx512_vnni").exit_code == 0
    with_default = _recipe_file(tiny, "gate: {max_accuracy_drop: 100.0, min_speedup_by_class: {avx512_vnni: 1000.0, default: 0.001}}\n")
    assert _cli(tiny, with_default, cls="none").exit_code == 0


# --- the CI matrix file ---------------------------------------------------------------------


def test_the_repository_targets_file_gives_a_matrix_of_recipes_by_enabled_targets():
    cfg = tg.load_targets(ROOT / tg.DEFAULT_FILE)
    assert any(t.runs_on == ("ubuntu-latest",) and t.enabled and t.required for t in cfg.targets)
    selfhosted = [t for t in cfg.targets if "self-hosted" in t.runs_on]
    assert selfhosted and all(t.isa_class in ISA_CLASSES for t in selfhosted)
    mx = tg.matrix(cfg, root=ROOT)["include"]
    enabled = [t.name for t in cfg.targets if t.enabled]
    assert [(c["recipe"], c["target"]) for c in mx] == [(r, t) for r in cfg.recipes for t in enabled]
    assert len({c["cell"] for c in mx}) == len(mx)
    for c in mx:
        assert (ROOT / c["recipe"]).is_file()


def test_a_manual_run_chooses_recipes_and_targets_even_disabled_ones():
    cfg = tg.load_targets(ROOT / tg.DEFAULT_FILE)
    off = next(t for t in cfg.targets if not t.enabled)
    mx = tg.matrix(cfg, "recipes/int8.yaml recipes/mobilefacenet-local.yaml", f"{off.name},github-hosted", root=ROOT)["include"]
    assert [(c["recipe_id"], c["target"]) for c in mx] == [
        ("int8", off.name), ("int8", "github-hosted"), ("mobilefacenet-local", off.name), ("mobilefacenet-local", "github-hosted")
    ]
    assert mx[0]["runs_on"] == list(off.runs_on) and mx[0]["isa_class"] == off.isa_class and mx[0]["cell"] == f"int8--{off.name}"
    with pytest.raises(UserError, match="unknown target 'nope'"):
        tg.matrix(cfg, "", "nope", root=ROOT)
    with pytest.raises(UserError, match="recipe not found"):
        tg.matrix(cfg, "recipes/missing.yaml", "", root=ROOT)


@pytest.mark.parametrize(
    "text,message",
    [
        ("recipes: [a.yaml]\ntargets: []\n", "no targets"),
        ("targets: [{name: x, runs-on: [ubuntu-latest], isa_class: avx3}]\n", "isa_class 'avx3'"),
        ("targets: [{name: x, runs-on: []}]\n", "runs-on"),
        ("targets: [{name: 'a b', runs-on: u}]\n", "name must be"),
        ("targets: [{name: x, runs-on: u, labels: [y]}]\n", "unknown key 'labels'"),
        ("targets: [{name: x, runs-on: u}, {name: x, runs-on: v}]\n", "a second target named 'x'"),
        ("targets: [{name: x, runs-on: u, required: 'yes'}]\n", "required must be true or false"),
    ],
)
def test_a_bad_targets_file_names_the_entry(tmp_path, text, message):
    p = tmp_path / "targets.yml"
    p.write_text(text)
    with pytest.raises(UserError, match=message):
        tg.load_targets(p)


def test_matrix_command_prints_github_outputs_and_check_class_guards_the_runner(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert ci.main(["matrix"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("matrix=") and json.loads(out[0][len("matrix="):])["include"]
    monkeypatch.setenv(CPU_CLASS_ENV, "avx2")
    assert ci.main(["check-class", "avx2"]) == 0 and ci.main(["check-class", ""]) == 0
    assert ci.main(["check-class", "avx512_vnni"]) == 2
    assert "expects ISA class avx512_vnni" in capsys.readouterr().err


def test_classes_from_flags_ignores_unrelated_flags():
    assert classes_from_flags(["sse2", "avx512f"]).classes == ()
