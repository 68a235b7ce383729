"""The benchmark scripts run end to end in a tiny mode and print their tables.

No timing is asserted: only that every script builds what it measures and
reports one row per model or stage with finite, positive figures.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthdata import synthetic_bin  # noqa: E402

TINY = ["--depth", "18", "--width", "8"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return synthetic_bin(tmp_path_factory.mktemp("bench") / "calib.bin", pairs=4, size=(112, 112))


def _table_rows(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if set(r[0]) != {"-"}]  # drop the header and its rule


def test_speedup_prints_one_row_per_variant_with_a_positive_speedup(tmp_path, calib, capsys):
    import speedup

    res = speedup.main(TINY + ["--rounds", "2", "--runs", "1", "--warmup", "1", "--calib-samples", "4", "--calib", str(calib),
                               "--cache", str(tmp_path), "--variants", "ort-qop,ort-qop-pc"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert [r[0] for r in rows] == ["fp32", "ort-qop", "ort-qop-pc"]
    for r in rows[1:]:
        speed = float(r[3].split()[0])
        assert speed > 0
        assert re.fullmatch(r"\d+\.\d{2} \[\d+\.\d{2}-\d+\.\d{2}\]", r[3])
        assert 0.9 < float(r[4]) <= 1.0001  # worst cosine to fp32: a real int8 model of the same network
    assert len(res["rounds_ms"]["fp32"]) == 2
    # A second run reuses the cached int8 models instead of quantizing again.
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*-s4.onnx")}
    speedup.main(TINY + ["--rounds", "1", "--runs", "1", "--warmup", "0", "--calib-samples", "4", "--calib", str(calib),
                         "--cache", str(tmp_path), "--variants", "ort-qop,ort-qop-pc"])
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*-s4.onnx")} == before


def test_speedup_rejects_an_unknown_variant(tmp_path, calib):
    import speedup

    with pytest.raises(SystemExit):
        speedup.main(TINY + ["--cache", str(tmp_path), "--calib", str(calib), "--variants", "no-such-variant"])


def test_cost_reports_convert_and_quantize_of_the_stand_in(tmp_path, calib, capsys):
    import cost

    rows = cost.main(TINY + ["--calib", str(calib), "--calib-samples", "4", "--skip-mobilefacenet"])
    stages = [r[0] for r in rows]
    assert any(s.startswith("convert LResNet18E-IR") for s in stages)
    assert any(s.startswith("quantize LResNet18E-IR") for s in stages)
    total = next(r for r in rows if r[0].startswith("convert + quantize"))
    assert float(total[1]) > 0 and float(total[2]) > 0 and float(total[3]) > 0  # wall s, CPU s, peak MB
    assert "convert + quantize" in capsys.readouterr().out


def test_profile_sums_kernel_time_by_op_type(tmp_path, calib, capsys):
    import common
    import profile_ops

    fp32 = common.prepare_fp32("standin", tmp_path, depth=18, width=8, opsets={11})[11]
    med = profile_ops.main([str(fp32), "--runs", "2", "--repeats", "1", "--warmup", "1"])
    ops = med[str(fp32)]
    assert ops["(sum of kernels)"] > 0
    assert any(k in ops for k in ("Conv", "FusedConv"))
    assert "op type" in capsys.readouterr().out
    # Split by kind, the convolutions are named by kernel and the total stays the same model's.
    kinds = profile_ops.main([str(fp32), "--runs", "2", "--repeats", "1", "--warmup", "1", "--conv-kinds"])[str(fp32)]
    assert "Conv full 3x3" in kinds and not {"Conv", "FusedConv"} & set(kinds)
    assert kinds["(sum of kernels)"] > 0
