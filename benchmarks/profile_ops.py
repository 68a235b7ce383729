"""Where the time goes: onnxruntime's per-operator profile of fp32 and int8 models, by op type.

    python benchmarks/profile_ops.py artifacts/bench-cache/lresnet100w64-opset11.onnx \
        artifacts/bench-cache/lresnet100w64-ort-qop-pc-s100.onnx --runs 10

Each model gets a session with ``enable_profiling`` (same thread settings as
the latency benchmark), a few warm-up runs, then ``--runs`` batch-1 runs; the
kernel times of the profiled runs are summed by op type (after onnxruntime's
graph optimisations, so the names are the kernels that actually ran, e.g.
``QLinearConv`` or the NCHWc ``Conv``) and divided by the run count. The
models are profiled one after the other, alternating, ``--repeats`` times, and
the per-op figure is the median over repeats. ``--conv-kinds`` splits the
convolutions into pointwise, depthwise and full ones by kernel size (read from
the optimised graph onnxruntime runs).

The input is a real LFW face preprocessed as the model expects (``--recipe``
takes ``model.input`` from a recipe; ``--mean``/``--std`` switch to mean/std
scaling): per-channel PRelu costs depend on the data, and uniform noise gives
a different op profile from a face. Without ../shared the input falls back to
seeded random pixels, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def face_input(spec, index: int = 0) -> tuple[np.ndarray, str]:
    """One preprocessed LFW face (``spec``: recipe ``model.input``) and a line saying what it is."""
    from pipeline.data.bins import read_bin
    from pipeline.data.preprocess import preprocess

    if common.LFW.exists():
        b = read_bin(common.LFW)
        x = preprocess(b.decode_many(np.array([index])), spec)
        return x, f"input: LFW face {index} of {common.LFW.name}, {spec.channels}, scale {spec.scale}"
    h, w = spec.size
    pixels = np.random.default_rng(0).integers(0, 256, size=(1, h, w, 3), dtype=np.uint8)
    return preprocess(pixels, spec), f"input: seeded random pixels ({common.LFW} not found), scale {spec.scale}"


def input_spec(recipe: Path | None, mean: list[float] | None, std: list[float] | None, bgr: bool):
    from pipeline.recipe import InputSpec, load_recipe

    spec = load_recipe(recipe).model.input if recipe is not None else InputSpec()
    changes: dict = {}
    if mean is not None or std is not None:
        changes["scale"] = "mean_std"
        if mean is not None:
            changes["mean"] = mean * 3 if len(mean) == 1 else mean
        if std is not None:
            changes["std"] = std * 3 if len(std) == 1 else std
    if bgr:
        changes["channels"] = "BGR"
    return InputSpec.model_validate({**spec.model_dump(), **changes}) if changes else spec


def conv_kinds(optimized: Path) -> dict[str, str]:
    """Node name -> "<op> pointwise" / "<op> depthwise KxK" / "<op> full KxK" for the convolutions of an optimised graph."""
    import onnx

    m = onnx.load(str(optimized))
    inits = {t.name: t for t in m.graph.initializer}
    out: dict[str, str] = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "FusedConv", "QLinearConv"):
            continue
        attrs = {a.name: a for a in n.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        if "kernel_shape" in attrs:
            k = tuple(attrs["kernel_shape"].ints)
        else:
            w = inits.get(n.input[3] if n.op_type == "QLinearConv" else n.input[1])
            k = tuple(w.dims[2:]) if w is not None else ()
        size = "x".join(str(v) for v in k) or "?"
        op = "QLinearConv" if n.op_type == "QLinearConv" else "Conv"
        out[n.name] = f"{op} depthwise {size}" if group > 1 else (f"{op} pointwise" if k == (1, 1) else f"{op} full {size}")
    return out


def profile_once(path: Path, x: np.ndarray, *, runs: int, warmup: int, threads: int, tmp: str, by_kind: bool = False) -> dict[str, float]:
    """Kernel ms per run by op type (``by_kind``: convolutions split into pointwise, depthwise and full, by kernel size)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, path.stem)
    optimized = Path(tmp) / f"{path.stem}-optimized.onnx"
    if by_kind:  # the graph as it runs (NCHWc and fused nodes), whose node names the profile uses
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    kinds = conv_kinds(optimized) if by_kind else {}
    name = sess.get_inputs()[0].name
    one = x[:1]
    for _ in range(warmup):
        sess.run(None, {name: one})
    for _ in range(runs):
        sess.run(None, {name: one})
    trace = json.loads(Path(sess.end_profiling()).read_text())
    runs_ev = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # model_run events are in order: the warm-up runs are the first ones, left out here.
    keep = runs_ev[-runs:]
    lo = keep[0]["ts"]
    out: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= lo:
            op = e.get("args", {}).get("op_name", "?")
            op = kinds.get(e["name"][: -len("_kernel_time")], op)
            out[op] += e["dur"] / 1000.0 / runs
            total += e["dur"] / 1000.0 / runs
    out["(model_run wall)"] = float(np.mean([e["dur"] for e in keep])) / 1000.0
    out["(sum of kernels)"] = total
    return dict(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--recipe", type=Path, default=None, help="take the input preprocessing from this recipe's model.input")
    ap.add_argument("--mean", type=float, nargs="+", default=None, help="mean/std scaling: mean (one value or three)")
    ap.add_argument("--std", type=float, nargs="+", default=None, help="mean/std scaling: std (one value or three)")
    ap.add_argument("--bgr", action="store_true", help="the model takes BGR")
    ap.add_argument("--face", type=int, default=0, help="index of the LFW image fed to the models")
    ap.add_argument("--conv-kinds", action="store_true", help="split Conv/QLinearConv into pointwise, depthwise and full, by kernel size")
    a = ap.parse_args(argv)
    for v in (a.mean, a.std):
        if v is not None and len(v) not in (1, 3):
            ap.error("--mean and --std take one value or three")
    from pipeline.core.environment import physical_cores

    threads = a.threads or physical_cores()
    x, what = face_input(input_spec(a.recipe, a.mean, a.std, a.bgr), a.face)
    per: dict[str, list[dict[str, float]]] = {str(p): [] for p in a.models}
    load0 = common.load_avg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = a.models if r % 2 == 0 else a.models[::-1]
            for p in order:
                per[str(p)].append(profile_once(p, x, runs=a.runs, warmup=a.warmup, threads=threads, tmp=tmp, by_kind=a.conv_kinds))
    med: dict[str, dict[str, float]] = {}
    for p, reps in per.items():
        ops = set().union(*reps)
        med[p] = {op: float(np.median([d.get(op, 0.0) for d in reps])) for op in ops}
    ops = sorted(set().union(*med.values()), key=lambda op: -max(m.get(op, 0.0) for m in med.values()))
    special = [o for o in ops if o.startswith("(")]
    ops = [o for o in ops if not o.startswith("(")][: a.top] + special
    stems = [Path(p).stem for p in med]
    # int8.onnx in several build folders: name each by its folder too.
    names = [f"{Path(p).parent.name}/{st}" if stems.count(st) > 1 else st for p, st in zip(med, stems)]
    header = ["op type"] + [f"{n} ms/run (share)" for n in names]
    rows = []
    for op in ops:
        row = [op]
        for p in med:
            v = med[p].get(op, 0.0)
            tot = med[p].get("(sum of kernels)", 1.0)
            row.append(f"{v:.2f}" + ("" if op.startswith("(") else f" ({100 * v / tot:.0f}%)"))
        rows.append(row)
    print(f"onnxruntime profile, batch 1, {threads} threads, {a.runs} runs x {a.repeats} repeats (median); load average {load0} -> {common.load_avg()}")
    print(common.cpu_line())
    print(what)
    print(common.markdown_table(header, rows))
    return med


if __name__ == "__main__":
    main()
