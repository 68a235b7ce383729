"""The recipe schema: validation that names keys and lines, overrides, docs kept in step."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.core.errors import UserError
from pipeline.recipe import load_recipe, parse_recipe, schema_markdown, with_overrides

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipe_loads_with_pinned_model_hash():
    r = load_recipe(ROOT / "recipes" / "int8.yaml")
    assert r.name == "arcfaceresnet100-int8"
    assert r.model.sha256 == "f3a6bc281e72f88862f5748b53be3d76b3b48f8f1ab1f4a537941bdc4e1b01da"
    assert r.model.input.name == "data" and r.model.input.scale == "raw"
    assert r.data is not None and r.data.member == "lfw.bin"


def test_every_shipped_recipe_is_valid():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for p in recipes:
        load_recipe(p)


def test_unknown_key_is_named_with_its_line(tmp_path):
    p = _write(tmp_path, "name: x\nmodel:\n  urls: [a.onnx]\n  sha265: abc\n")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    assert "model.sha265" in str(e.value) and "unknown key" in str(e.value) and f"{p}:4" in str(e.value)


def test_wrong_type_is_named_and_not_coerced(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: {urls: [a.onnx]}\ncalibration:\n  samples: '200'\n")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    assert "calibration.samples" in str(e.value) and ":4" in str(e.value)


def test_missing_required_key_is_named(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(UserError, match="model: required key is missing"):
        load_recipe(p)


def test_invalid_yaml_gives_line(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_recipe(p)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_non_mapping_recipe_is_rejected(tmp_path, text):
    with pytest.raises(UserError):
        load_recipe(_write(tmp_path, text))


def test_bad_sha256_and_choice_are_rejected():
    with pytest.raises(UserError, match="model.sha256"):
        parse_recipe({"name": "x", "model": {"urls": ["a"], "sha256": "xyz"}})
    with pytest.raises(UserError, match="quantization.engine"):
        parse_recipe({"name": "x", "model": {"urls": ["a"]}, "quantization": {"engine": "tensorrt"}})


def test_overrides_win_and_none_keeps_recipe_value():
    r = parse_recipe({"name": "x", "model": {"urls": ["a"]}, "calibration": {"samples": 50}})
    r2 = with_overrides(r, {"calibration.samples": 10, "calibration.seed": None, "quantization.engine": "ort"})
    assert r2.calibration.samples == 10 and r2.calibration.seed == 0 and r2.quantization.engine == "ort"
    with pytest.raises(UserError, match="quantization.engine"):
        with_overrides(r, {"quantization.engine": "nope"})


def test_recipe_hash_changes_with_settings_only():
    a = parse_recipe({"name": "x", "model": {"urls": ["a"]}})
    b = parse_recipe({"name": "x", "model": {"urls": ["a"]}, "calibration": {"samples": 200}})
    c = parse_recipe({"name": "x", "model": {"urls": ["a"]}, "calibration": {"samples": 100}})
    assert a.sha256() == b.sha256() != c.sha256()


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: {urls: [m.onnx]}\n")
    assert load_recipe(p).base_dir == tmp_path.resolve()


def test_docs_recipe_table_is_generated_from_schema():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    block = doc.split("<!-- recipe-doc:start -->\n")[1].split("<!-- recipe-doc:end -->")[0]
    assert block == schema_markdown(), "docs/recipes.md's recipe table is stale: regenerate it from `qpipe recipe-doc`"


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path):
    p = _write(tmp_path, "name: x\nmodel: {urls: [m.onnx]}\nbogus: 1\n")
    res = CliRunner().invoke(app, ["quantize", "--recipe", str(p), "--model", "m.onnx", "--calib", "c.bin"])
    assert res.exit_code == 2
    assert "bogus" in res.output and "Traceback" not in res.output
