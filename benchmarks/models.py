"""The shipped recipe end to end on the shared face networks: accuracy, speed over the user's model and over the fastest fp32.

    python benchmarks/models.py                                  # all three models, 6,000 LFW pairs, 40 rounds
    python benchmarks/models.py --models prelu512 --pairs 600 --rounds 10     # a quick look
    python benchmarks/models.py --models standin --depth 18 --width 16 --calib-samples 8 --rounds 3   # smoke run

Models: ``relu6`` (../shared MobileFaceNet, ReLU6, opset 8), ``prelu512`` (../shared
PRelu MobileFaceNet-512, opset 9, (x-127)/128 input) and ``standin`` (the
LResNet100E-IR stand-in of ``qpipe synth-model``: random weights, so its
accuracy columns show the worst embedding cosine of int8 to fp32 over 16 faces).

For each model, as ``qpipe run`` would with ``recipes/int8.yaml`` (only
``model.input`` adapted to the model):

1. convert twice: the user's model as given (``convert.prelu: keep``: only the
   opset conversion) and as the recipe converts it (its ``convert.prelu``),
   both through the equivalence gate;
2. ``qpipe quantize`` the recipe's conversion, in a child process (its wall
   time and peak memory are the stage's own figures);
3. ``qpipe verify`` fp32 (as given) and int8 on ``--pairs`` LFW pairs
   (accuracy only: ``--rounds 1`` there);
4. time fp32 as given, the recipe's fp32 and int8 in one process, interleaved
   (``common.interleaved``: back-to-back runs per model inside each round, no
   spinning thread pools), on a real preprocessed LFW face. Speedups are
   medians of per-round ratios with their interquartile range: over the user's
   model and over the fastest fp32 qpipe makes of it (the faster of the two
   conversions).

Everything built is kept in ``--cache`` (per model and recipe hash); ``--rebuild``
builds again. Prints one Markdown table, the CPU (model and ISA) and the load
average during the timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RECIPE = common.ROOT / "recipes" / "int8.yaml"
PRELU512 = common.SHARED / "models" / "mobilefacenet512-prelu-opset9.onnx"
STANDIN_FACES = 16  # faces for the stand-in's worst cosine


@dataclass(frozen=True)
class Subject:
    name: str
    input: dict[str, Any]  # recipe model.input
    real: bool  # LFW accuracy means something


SUBJECTS = {
    "relu6": Subject("relu6", {"name": "data", "size": [112, 112], "channels": "RGB", "scale": "raw"}, True),
    "prelu512": Subject(
        "prelu512",
        {"name": "input", "size": [112, 112], "channels": "RGB", "scale": "mean_std", "mean": [127, 127, 127], "std": [128, 128, 128]},
        True,
    ),
    "standin": Subject("standin", {"name": "data", "size": [112, 112], "channels": "RGB", "scale": "raw"}, False),
}


def isa_line() -> str:
    """CPU model and the integer-dot-product ISA onnxruntime's int8 kernels can use."""
    from pipeline.core import environment as envinfo

    cpu = envinfo.cpu_info()
    f = cpu.get("flags", {})
    isa = [name for name, on in [
        ("AVX2", f.get("avx2")), ("AVX-512", f.get("avx512f")), ("AVX-512 VNNI", f.get("avx512_vnni")),
        ("AVX-VNNI", f.get("avx_vnni")), ("AMX", f.get("amx_int8") or f.get("amx_tile")),
    ] if on]
    from importlib.metadata import version

    return (f"CPU {cpu.get('model')}, {cpu.get('physical_cores')} physical cores; ISA: {', '.join(isa) or 'no AVX2'}"
            f"{'' if any(v in isa for v in ('AVX-512 VNNI', 'AVX-VNNI', 'AMX')) else ' (no VNNI/AMX)'}; onnxruntime {version('onnxruntime')}")


def source(subject: Subject, cache: Path, depth: int, width: int) -> Path:
    if subject.name == "relu6":
        return common.MFN
    if subject.name == "prelu512":
        return PRELU512
    src = cache / f"standin-d{depth}w{width}-opset8.onnx"
    if not src.exists():
        from pipeline.stages.synth import synth_model

        cache.mkdir(parents=True, exist_ok=True)
        synth_model(src, depth=depth, width=width)
    return src


def recipe_for(subject: Subject, samples: int | None) -> dict[str, Any]:
    data = yaml.safe_load(RECIPE.read_text())
    data["model"]["input"] = dict(subject.input)
    if samples is not None:
        data.setdefault("calibration", {})["samples"] = samples
    return data


def _qpipe(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli.app", *args], capture_output=True, text=True, cwd=common.ROOT)


def build(subject: Subject, src: Path, recipe_data: dict[str, Any], work: Path, *, rebuild: bool) -> dict[str, Any]:
    """Convert (as given and as the recipe says) and quantize; cached in ``work``."""
    from pipeline.recipe import parse_recipe
    from pipeline.stages.convert import convert

    r = parse_recipe(recipe_data, "benchmark recipe")
    work.mkdir(parents=True, exist_ok=True)
    meta = work / "build.json"
    if meta.exists() and not rebuild:
        return json.loads(meta.read_text())
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    c = r.convert
    info: dict[str, Any] = {"source": str(src)}
    paths = {}
    for role, prelu in (("given", "keep"), ("recipe", c.prelu)):
        out = work / f"fp32-{role}.onnx"
        res = convert(src, out, opset=c.opset, dynamic_batch=c.dynamic_batch, data=common.LFW if common.LFW.exists() else None,
                      input_spec=r.model.input, samples=c.check_samples, min_cosine=c.min_cosine, prelu=prelu)
        info[f"convert_{role}"] = {"worst_cosine": res.worst_cosine, "repairs": res.repairs, "prelu": res.prelu}
        paths[role] = out
    int8 = work / "int8.onnx"
    t0 = time.perf_counter()
    p = _qpipe(["quantize", "--recipe", str(recipe_file), "--model", str(paths["recipe"]), "--calib", str(common.LFW),
                "--out", str(int8), "--json", "-q"])
    if p.returncode != 0:
        raise SystemExit(f"qpipe quantize failed on {subject.name} (exit {p.returncode}):\n{p.stderr[-3000:]}")
    q = json.loads(p.stdout)
    info["quantize"] = {"seconds": q.get("seconds", time.perf_counter() - t0), "peak_rss_mb": q.get("peak_rss_mb"),
                        "op_counts": q.get("op_counts", {}), "load_avg": common.load_avg()}
    info["paths"] = {"fp32_given": str(paths["given"]), "fp32_recipe": str(paths["recipe"]), "int8": str(int8),
                     "recipe": str(recipe_file)}
    meta.write_text(json.dumps(info, indent=1))
    return info


def accuracy(subject: Subject, info: dict[str, Any], pairs: int, cache: Path) -> dict[str, Any]:
    """LFW accuracy of fp32 as given and int8 through ``qpipe verify`` (rounds 1: accuracy only)."""
    p = info["paths"]
    rep = Path(p["int8"]).parent / f"verify-{pairs}"
    args = ["verify", "--recipe", p["recipe"], "--fp32", p["fp32_given"], "--int8", p["int8"], "--data", str(common.LFW),
            "--rounds", "1", "--min-speedup", "0", "--max-accuracy-drop", "100", "--cache-dir", str(cache / "embeddings"),
            "--report", str(rep), "-q"]
    if pairs < 6000:
        args += ["--pairs", str(pairs)]
    r = _qpipe(args)
    if r.returncode not in (0, 1) or not (rep / "report.json").exists():
        raise SystemExit(f"qpipe verify failed on {subject.name} (exit {r.returncode}):\n{r.stderr[-3000:]}")
    d = json.loads((rep / "report.json").read_text())
    scale = 100.0 if d.get("accuracy_unit", "").startswith("fraction") else 1.0
    fp, i8 = d["fp32"]["accuracy"], d["int8"]["accuracy"]
    if fp is not None and fp <= 1.0 and scale == 1.0:
        scale = 100.0
    return {"fp32": fp * scale, "int8": i8 * scale, "pairs": pairs}


def timing(subject: Subject, info: dict[str, Any], *, rounds: int, runs: int, warmup: int, threads: int) -> dict[str, Any]:
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess
    from pipeline.recipe import InputSpec

    spec = InputSpec.model_validate(subject.input)
    if common.LFW.exists():
        x = preprocess(read_bin(common.LFW).decode_many(np.arange(STANDIN_FACES)), spec)
    else:
        x = preprocess(np.random.default_rng(0).integers(0, 256, (STANDIN_FACES, 112, 112, 3), dtype=np.uint8), spec)
    p = info["paths"]
    models = {"fp32 given": Path(p["fp32_given"]), "fp32 recipe": Path(p["fp32_recipe"]), "int8": Path(p["int8"])}
    done = info["convert_recipe"]["prelu"]
    if not (done.get("rewritten") or done.get("leaky_relu")):  # the recipe's conversion is the as-given one
        models.pop("fp32 recipe")
    t = common.interleaved(models, x[:1], rounds=rounds, runs=runs, warmup=warmup, threads=threads)
    fastest = min((n for n in models if n.startswith("fp32")), key=lambda n: float(np.median(t.rounds_ms[n])))
    out = {
        "ms": {n: float(np.median(t.rounds_ms[n])) for n in models},
        "over_given": t.speedup("fp32 given", "int8"),
        "over_fastest": t.speedup(fastest, "int8"),
        "fastest_fp32": fastest,
        "fp32_recipe_over_given": t.speedup("fp32 given", "fp32 recipe") if "fp32 recipe" in models else (1.0, 1.0, 1.0),
        "load": f"{t.load_before} -> {t.load_after}",
    }
    if not subject.real:
        out["worst_cosine"] = common.worst_cosine(Path(p["fp32_given"]), Path(p["int8"]), x)
    return out


def fmt_speed(s: tuple[float, float, float]) -> str:
    return f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="relu6,prelu512,standin", help=f"comma list from: {', '.join(SUBJECTS)}")
    ap.add_argument("--pairs", type=int, default=6000, help="LFW pairs for accuracy (6000: the full set; 0: skip accuracy)")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds")
    ap.add_argument("--runs", type=int, default=3, help="batch-1 runs per model per round (round figure: their median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration images (default: the recipe's)")
    ap.add_argument("--depth", type=int, default=100, help="stand-in depth")
    ap.add_argument("--width", type=int, default=64, help="stand-in width")
    ap.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE / "models")
    ap.add_argument("--rebuild", action="store_true", help="convert and quantize again even if cached")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUBJECTS]
    if unknown or not names:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(SUBJECTS)}")
    if not common.LFW.exists():
        ap.error(f"{common.LFW} is missing (calibration and accuracy need the LFW .bin)")
    for n in names:
        if n in ("relu6", "prelu512") and not (common.MFN if n == "relu6" else PRELU512).exists():
            ap.error(f"{n}: {common.MFN if n == 'relu6' else PRELU512} is missing")
    from pipeline.core.environment import physical_cores

    threads = a.threads or physical_cores()
    results: dict[str, Any] = {}
    for n in names:
        subject = SUBJECTS[n]
        src = source(subject, a.cache, a.depth, a.width)
        data = recipe_for(subject, a.calib_samples)
        key = hashlib.sha256(json.dumps([str(src), os.path.getsize(src), data], sort_keys=True).encode()).hexdigest()[:12]
        stem = f"{n}-d{a.depth}w{a.width}" if n == "standin" else n
        info = build(subject, src, data, a.cache / f"{stem}-{key}", rebuild=a.rebuild)
        res: dict[str, Any] = {"build": info}
        if subject.real and a.pairs > 0:
            res["accuracy"] = accuracy(subject, info, a.pairs, a.cache)
        res["speed"] = timing(subject, info, rounds=a.rounds, runs=a.runs, warmup=a.warmup, threads=threads)
        results[n] = res

    header = ["model", "fp32 LFW", "int8 LFW", "int8 over the user's model [IQR]", "int8 over the fastest fp32 [IQR]",
              "fastest fp32", "fp32 ms / int8 ms", "fp32 ops left", "quantize s", "peak MB"]
    rows = []
    for n, res in results.items():
        s, b = res["speed"], res["build"]
        acc = res.get("accuracy")
        if "worst_cosine" in s:
            fp_acc, i8_acc = "-", f"worst cosine {s['worst_cosine']:.4f}"
        elif acc:
            fp_acc, i8_acc = f"{acc['fp32']:.2f}", f"{acc['int8']:.2f}" + (f" ({acc['pairs']} pairs)" if acc["pairs"] < 6000 else "")
        else:
            fp_acc = i8_acc = "not run"
        left = b["quantize"]["op_counts"].get("fp32", {})
        fastest = "as given" if s["fastest_fp32"] == "fp32 given" else f"recipe's ({fmt_speed(s['fp32_recipe_over_given'])} over given)"
        ms = s["ms"]
        rows.append([
            n, fp_acc, i8_acc, fmt_speed(s["over_given"]), fmt_speed(s["over_fastest"]), fastest,
            f"{ms[s['fastest_fp32']]:.2f} / {ms['int8']:.2f}",
            ", ".join(f"{k} {v}" for k, v in sorted(left.items())) or "none",
            f"{b['quantize']['seconds']:.0f}", f"{b['quantize']['peak_rss_mb']:.0f}" if b["quantize"].get("peak_rss_mb") else "-",
        ])
    print(f"shipped recipe ({RECIPE.relative_to(common.ROOT)}) end to end; batch 1, {threads} threads, {a.rounds} rounds x {a.runs} runs, "
          f"no spinning, a real preprocessed LFW face")
    print(isa_line())
    print("load average during timing: " + "; ".join(f"{n} {r['speed']['load']}" for n, r in results.items()))
    print(common.markdown_table(header, rows))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
