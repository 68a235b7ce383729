"""int8 over fp32 speedup of quantization variants, timed side by side in one process.

    python benchmarks/speedup.py                                   # depth-100 stand-in, default variants
    python benchmarks/speedup.py --model mobilefacenet --lfw-pairs 6000
    python benchmarks/speedup.py --depth 18 --width 16 --rounds 2 --calib-samples 4   # smoke run

The fp32 model (converted to opset 11, dynamic batch) and each int8 variant
are built once into the cache (``artifacts/bench-cache``; quantize time and
peak memory are recorded then, in a child process). All sessions are then
timed in one loop (see ``common.interleaved``): speedup = median over rounds
of fp32 round latency / variant round latency, with its interquartile range.
``--lfw-pairs`` adds the insightface LFW accuracy (flip-sum, 10 folds) of fp32
and every variant; meaningful for the real MobileFaceNet only (the stand-in
has random weights, so its column shows the worst embedding cosine to fp32
over 16 faces instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_VARIANTS = "inc-qop,ort-qop,ort-qop-pc,ort-qdq-pc-o13,ort-qop-pc-u8u8"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["standin", "mobilefacenet"], default="standin")
    ap.add_argument("--depth", type=int, default=100, help="stand-in depth (18, 50, 100)")
    ap.add_argument("--width", type=int, default=64, help="stand-in width (64: the Zoo model)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list from: {', '.join(common.VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3, help="batch-1 runs per model per round (round figure: their median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--calib-samples", type=int, default=200)
    ap.add_argument("--calib", type=Path, default=common.LFW, help="calibration images (.bin or folder); default LFW")
    ap.add_argument("--lfw-pairs", type=int, default=0, help="LFW pairs to score every model on (0: skip)")
    ap.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE)
    ap.add_argument("--rebuild", action="store_true", help="re-quantize even if cached")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    a = ap.parse_args(argv)

    from pipeline.core.environment import physical_cores

    threads = a.threads or physical_cores()
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in common.VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}")
    variants = [common.VARIANTS[n] for n in names]
    calib = a.calib
    if not calib.exists():
        ap.error(f"{calib} is missing (calibration images)")

    fp32 = common.prepare_fp32(a.model, a.cache, depth=a.depth, width=a.width, opsets={11} | {v.opset for v in variants})
    stem = fp32[11].name.rsplit("-opset", 1)[0]
    built: dict[str, tuple[Path, dict]] = {}
    for v in variants:
        print(f"[quantize] {v.name} (load {common.load_avg()})", file=sys.stderr, flush=True)
        built[v.name] = common.quantize_variant(v, fp32[v.opset], a.cache, stem, calib=calib, samples=a.calib_samples, rebuild=a.rebuild)

    x = common.faces(16)
    quality: dict[str, str] = {}
    acc_raw: dict[str, dict] = {}
    if a.lfw_pairs > 0:
        from pipeline.data.bins import read_bin
        from pipeline.stages.quantize.tuning import pair_accuracy
        from pipeline.recipe import InputSpec

        b = read_bin(common.LFW)
        for n, p in [("fp32", fp32[11])] + [(k, v[0]) for k, v in built.items()]:
            print(f"[lfw] {n}", file=sys.stderr, flush=True)
            r = pair_accuracy(p, b, InputSpec(), pairs=a.lfw_pairs)
            acc_raw[n] = {"accuracy": r.accuracy, "std": r.accuracy_std, "pairs": r.pairs}
            quality[n] = f"{r.accuracy:.2f} +- {r.accuracy_std:.2f}"
    else:
        quality["fp32"] = "1 (ref)"
        for n, (p, _) in built.items():
            quality[n] = f"{common.worst_cosine(fp32[11], p, x):.4f}"

    print(f"[timing] {len(built) + 1} models x {a.rounds} rounds x {a.runs} runs, {threads} threads", file=sys.stderr, flush=True)
    paths = {"fp32": fp32[11], **{n: p for n, (p, _) in built.items()}}
    t = common.interleaved(paths, x, rounds=a.rounds, runs=a.runs, warmup=a.warmup, threads=threads)

    qcol = "LFW acc (%)" if a.lfw_pairs else "worst cos vs fp32"
    header = ["variant", "format, opset", "p50 ms", "speedup median [IQR]", qcol, "size MB", "quantize s (CPU s)", "peak MB", "Q/DQ nodes", "fp32 ops left"]
    rows = [["fp32", "-, 11", f"{t.p50('fp32'):.1f}", "1.00", quality["fp32"], f"{fp32[11].stat().st_size / 1e6:.1f}", "-", "-", "-", "-"]]
    for v in variants:
        p, info = built[v.name]
        s50, s25, s75 = t.speedup("fp32", v.name)
        oc = info["op_counts"]
        qdq = sum(oc.get("quant_dequant", {}).values())
        left = ", ".join(f"{k} {c}" for k, c in sorted(oc.get("fp32", {}).items()))
        rows.append([
            v.name, f"{v.format}{' pc' if v.per_channel else ''}, {v.opset}", f"{t.p50(v.name):.1f}",
            f"{s50:.2f} [{s25:.2f}-{s75:.2f}]", quality[v.name], f"{info['bytes'] / 1e6:.1f}",
            f"{info['seconds']:.0f} ({info['cpu_seconds']:.0f})" if "cpu_seconds" in info else f"{info['seconds']:.0f} (n/a)",
            f"{info['peak_rss_mb']:.0f}", str(qdq), left,
        ])
    title = (f"{'LResNet%dE-IR stand-in (width %d)' % (a.depth, a.width) if a.model == 'standin' else 'MobileFaceNet'}: "
             f"batch 1, {threads} threads, {a.rounds} rounds x {a.runs} runs, {a.calib_samples} calibration faces; "
             f"load average {t.load_before} -> {t.load_after}")
    print(title)
    print(common.cpu_line())
    print(common.markdown_table(header, rows))
    for v in variants:
        print(f"- {v.name}: {v.note}")
    result = {
        "title": title, "cpu": common.cpu_line(), "header": header, "rows": rows,
        "rounds_ms": t.rounds_ms, "lfw": acc_raw, "quantize": {n: info for n, (_, info) in built.items()},
    }
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
