"""Cost of the pipeline: convert + quantize of the stand-in, full-LFW verify of MobileFaceNet.

    python benchmarks/cost.py                          # recipes/int8.yaml's settings
    python benchmarks/cost.py --recipe recipes/int8-fast.yaml
    python benchmarks/cost.py --depth 18 --width 16 --verify-pairs 300 --rounds 2   # smoke run

Each stage runs in a fresh child process, one after the other, through the
pipeline's own stage functions (``convert``, ``quantize``, ``verify``) with
the recipe's convert/calibration/quantization/verify sections; the table shows
its wall time and the child's peak resident memory (``ru_maxrss``). Nothing
is cached: every figure is a cold run. The stand-in's own full-LFW verify
(24,000 passes per model) is too long to run here, so ``--throughput`` times
batch-16 inference of its fp32 and int8 models and extrapolates the
int8-only verify time (fp32 embeddings cached), labelled as an estimate.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RECIPE = common.ROOT / "recipes" / "int8.yaml"
LFW_PASSES = 24_000  # 12,000 images and their flips


def _usage() -> dict[str, float]:
    """Peak RSS and CPU seconds of this (child) process. CPU time hardly grows with other jobs' load, so on
    a loaded machine it bounds from above what a step takes on an idle one (when it keeps at least one core busy)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": ru.ru_maxrss / 1024.0, "cpu_seconds": ru.ru_utime + ru.ru_stime}


def _stage_synth(out: str, depth: int, width: int) -> dict[str, Any]:
    from pipeline.stages.synth import synth_model

    t0 = time.perf_counter()
    synth_model(Path(out), depth=depth, width=width)
    return {"seconds": time.perf_counter() - t0, **_usage()}


def _stage_convert(src: str, dst: str, recipe: str) -> dict[str, Any]:
    from pipeline.stages.convert import convert
    from pipeline.recipe import load_recipe

    r = load_recipe(recipe)
    t0 = time.perf_counter()
    convert(Path(src), Path(dst), opset=r.convert.opset, dynamic_batch=r.convert.dynamic_batch)
    return {"seconds": time.perf_counter() - t0, **_usage()}


def _stage_quantize(src: str, calib: str, out: str, recipe: str, samples: int | None = None) -> dict[str, Any]:
    import logging

    from pipeline.recipe import load_recipe
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import quantize

    logging.disable(logging.WARNING)
    r = load_recipe(recipe)
    calibration = r.calibration if samples is None else r.calibration.model_copy(update={"samples": samples})
    t0 = time.perf_counter()
    res = quantize(Int8Job(model=src, calib=calib, out=out, input_spec=r.model.input, calibration=calibration, quantization=r.quantization))
    return {"seconds": time.perf_counter() - t0, **_usage(), "stage_seconds": res.seconds}


def _stage_verify(fp32: str, int8: str, data: str, recipe: str, pairs: int | None, rounds: int | None) -> dict[str, Any]:
    from pipeline.recipe import load_recipe
    from pipeline.stages.verify import verify

    r = load_recipe(recipe)
    vs = r.verify.model_copy(update={k: v for k, v in {"pairs": pairs, "rounds": rounds}.items() if v is not None})
    t0 = time.perf_counter()
    res = verify(Path(fp32), Path(int8), [Path(data)], input_spec=r.model.input, verify=vs, gate=r.gate)
    d = res.datasets[0]
    return {
        "seconds": time.perf_counter() - t0, **_usage(), "speedup": res.speed.speedup,
        **{f"{k}_{f}": getattr(getattr(d, k), a) for k in ("fp32", "int8") for f, a in (("embed_s", "seconds"), ("metrics", "metrics"))},
    }


def _stage_throughput(fp32: str, int8: str, batch: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    from pipeline.runtime.session import OnnxModel

    x = np.ascontiguousarray(np.resize(common.faces(batch), (batch, 3, 112, 112)), dtype=np.float32)
    models = {"fp32": OnnxModel(fp32), "int8": OnnxModel(int8)}
    for m in models.values():
        m(x)
    ms: dict[str, list[float]] = {"fp32": [], "int8": []}
    for r in range(rounds):
        for n in (["fp32", "int8"] if r % 2 == 0 else ["int8", "fp32"]):
            t0 = time.perf_counter()
            models[n](x)
            ms[n].append(time.perf_counter() - t0)
    return {n: batch / float(np.median(v)) for n, v in ms.items()}


def run(fn, *args) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv: list[str] | None = None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="convert/calibration/quantization/verify settings")
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--verify-pairs", type=int, default=None, help="LFW pairs for the MobileFaceNet verify (default: all 6,000)")
    ap.add_argument("--rounds", type=int, default=None, help="verify timing rounds (default: the recipe's)")
    ap.add_argument("--throughput", type=int, default=0, help="batch-16 rounds for the stand-in verify estimate (0: skip)")
    ap.add_argument("--calib", type=Path, default=common.LFW, help="calibration images for the stand-in (.bin or folder)")
    ap.add_argument("--calib-samples", type=int, default=None, help="stand-in calibration samples (default: the recipe's)")
    ap.add_argument("--skip-standin", action="store_true")
    ap.add_argument("--skip-mobilefacenet", action="store_true")
    a = ap.parse_args(argv)
    if not a.calib.exists() or (not a.skip_mobilefacenet and not (common.LFW.exists() and common.MFN.exists())):
        ap.error(f"missing {a.calib} or ../shared (MobileFaceNet, lfw.bin)")
    recipe = str(a.recipe.resolve())
    rows: list[list[str]] = []

    def row(what: str, r: dict[str, Any], target: str, extra: str = "") -> None:
        rows.append([what, f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", target, extra])
        print(f"[done] {what}: {r['seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB (load {common.load_avg()})", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(dir=common.ROOT / "artifacts" if (common.ROOT / "artifacts").is_dir() else None) as tmp:
        t = Path(tmp)
        load0 = common.load_avg()
        if not a.skip_mobilefacenet:
            conv, q = t / "mfn-conv.onnx", t / "mfn" / "int8.onnx"
            c = run(_stage_convert, str(common.MFN), str(conv), recipe)
            row("convert MobileFaceNet", c, "")
            qq = run(_stage_quantize, str(conv), str(common.LFW), str(q), recipe)
            row("quantize MobileFaceNet", qq, "")
            v = run(_stage_verify, str(conv), str(q), str(common.LFW), recipe, a.verify_pairs, a.rounds)
            f, i = v["fp32_metrics"], v["int8_metrics"]
            row(f"verify MobileFaceNet pair, {a.verify_pairs or 'all 6000'} LFW pairs, no cache", v, "120 s",
                f"LFW fp32 {f.accuracy:.2f}, int8 {i.accuracy:.2f}; embedding fp32 {v['fp32_embed_s']:.0f} s, "
                f"int8 {v['int8_embed_s']:.0f} s; timing speedup {v['speedup']:.2f}")
        if not a.skip_standin:
            src, conv, q = t / "standin-opset8.onnx", t / "standin-conv.onnx", t / "standin" / "int8.onnx"
            run(_stage_synth, str(src), a.depth, a.width)
            c = run(_stage_convert, str(src), str(conv), recipe)
            row(f"convert LResNet{a.depth}E-IR stand-in (w{a.width})", c, "")
            qq = run(_stage_quantize, str(conv), str(a.calib), str(q), recipe, a.calib_samples)
            row(f"quantize LResNet{a.depth}E-IR stand-in (w{a.width})", qq, "")
            both = {"seconds": c["seconds"] + qq["seconds"], "cpu_seconds": c["cpu_seconds"] + qq["cpu_seconds"],
                    "peak_rss_mb": max(c["peak_rss_mb"], qq["peak_rss_mb"])}
            row("convert + quantize (stand-in)", both, "60 s, 4 GB")
            if a.throughput:
                tp = run(_stage_throughput, str(conv), str(q), 16, a.throughput)
                est = LFW_PASSES / tp["int8"]
                rows.append(["stand-in full-LFW verify, fp32 cached (estimate)", f"{est:.0f}", "-", "-", "1200 s",
                             f"batch 16: fp32 {tp['fp32']:.1f} img/s, int8 {tp['int8']:.1f} img/s; fp32 uncached would add {LFW_PASSES / tp['fp32']:.0f} s"])
    print(f"pipeline cost, recipe {a.recipe.name}; load average {load0} -> {common.load_avg()}")
    print(common.cpu_line())
    print(common.markdown_table(["stage", "wall s", "CPU s", "peak RSS MB", "target", "notes"], rows))
    return rows


if __name__ == "__main__":
    main()
