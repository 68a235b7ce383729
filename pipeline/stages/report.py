"""The verify reports: report.json (machine), report.md (a person), report.png (ROC and latency).

Everything here reads a :class:`~pipeline.stages.verify.VerifyResult`; nothing is
measured. All three files are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np

from pipeline.core.files import atomic_path, atomic_write_json, atomic_write_text
from pipeline.stages.verify import VerifyResult, against_limit

REPORT_FILES = ("report.json", "report.md", "report.png")


def write_reports(result: VerifyResult, directory: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``directory``; return their paths.

    ``result.report_dir`` becomes ``directory`` (report.json and the summary name it).
    """
    directory = Path(directory)
    result.report_dir = directory
    paths = {name: directory / name for name in REPORT_FILES}
    atomic_write_json(paths["report.json"], result.to_dict())
    atomic_write_text(paths["report.md"], markdown(result))
    plot(result, paths["report.png"])
    return paths


# --- Markdown ---------------------------------------------------------------------


def _f(x: float | None, fmt: str = ".2f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return none
    return format(x, fmt)


def _diff(a: float | None, b: float | None, fmt: str = "+.2f") -> str:
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return "n/a"
    return format(b - a, fmt)


def verdict_lines(result: VerifyResult) -> list[str]:
    """The verdict as short lines (also what the CLI prints)."""
    lines = []
    if result.passed:
        lines.append("PASSED: int8 keeps accuracy within the allowed drop on every data set and meets the speedup.")
    else:
        lines.append("FAILED:")
        lines += [f"- {r}" for r in result.gate["reasons"]]
    for d in result.datasets:
        if d.subset:
            lines.append(f"SUBSET: {d.name} was verified on the first {d.pairs} of {d.total_pairs} pairs only; this is not the full-set gate.")
    return lines


def markdown(result: VerifyResult) -> str:
    sp = result.speed
    g = result.gate
    out: list[str] = ["# qpipe verify report", ""]
    out.append(f"**Verdict: {'PASSED' if result.passed else 'FAILED'}**")
    out.append("")
    for reason in g["reasons"]:
        out.append(f"- {reason}")
    for d in result.datasets:
        if d.subset:
            out.append(f"\n> **SUBSET: {d.name} was verified on the first {d.pairs} of {d.total_pairs} pairs only; this is not the full-set gate.**")
    out += [
        "",
        f"Gate: int8 accuracy >= fp32 accuracy - {g['max_accuracy_drop']:.2f} points on every data set, "
        f"and median batch-1 speedup over the user's model >= {g['min_speedup']:.2f}x." + (f" Speed threshold: {g['cpu_class']['why']}." if g.get("cpu_class") else ""),
        "",
        "| model | file | sha256 |",
        "| --- | --- | --- |",
        f"| fp32 | `{result.fp32['path']}` | `{result.fp32['sha256'][:16]}...` |",
        *([f"| baseline (as given) | `{result.baseline['path']}` | `{result.baseline['sha256'][:16]}...` |"] if result.baseline else []),
        f"| int8 | `{result.int8['path']}` | `{result.int8['sha256'][:16]}...` |",
        "",
        "## Accuracy",
        "",
        "insightface protocol: image + horizontal flip embeddings summed and L2-normalised, squared L2 distance, "
        f"{result.datasets[0].fp32.metrics.folds} folds without shuffle, threshold from np.arange(0, 4, 0.01) chosen on the "
        "other folds. Accuracy in percent (mean +- population std over folds).",
        "",
    ]
    for d in result.datasets:
        f, i = d.fp32.metrics, d.int8.metrics
        title = f"### {d.name} ({d.pairs} pairs"
        title += f", SUBSET of {d.total_pairs})" if d.subset else ")"
        out += [
            title,
            "",
            f"`{d.path}` sha256 `{d.sha256[:16]}...`",
            "",
            "| metric | fp32 | int8 | int8 - fp32 |",
            "| --- | ---: | ---: | ---: |",
            f"| accuracy (%) | {_f(f.accuracy)} +- {_f(f.accuracy_std)} | {_f(i.accuracy)} +- {_f(i.accuracy_std)} | {_diff(f.accuracy, i.accuracy)} |",
            f"| mean best threshold | {_f(f.threshold_mean, '.3f')} | {_f(i.threshold_mean, '.3f')} | {_diff(f.threshold_mean, i.threshold_mean, '+.3f')} |",
            f"| TAR @ FAR={f.far_target:g} (%) | {_f(f.tar_at_far)} +- {_f(f.tar_at_far_std)} | {_f(i.tar_at_far)} +- {_f(i.tar_at_far_std)} | {_diff(f.tar_at_far, i.tar_at_far)} |",
            f"| achieved FAR | {_f(f.far, '.5f')} | {_f(i.far, '.5f')} | |",
            f"| ROC AUC | {_f(f.roc_auc, '.5f')} | {_f(i.roc_auc, '.5f')} | {_diff(f.roc_auc, i.roc_auc, '+.5f')} |",
            f"| embeddings | {'cached' if d.fp32.cached else f'computed in {d.fp32.seconds:.1f} s'} | computed in {d.int8.seconds:.1f} s | |",
            "",
            f"Accuracy drop: **{_f(d.accuracy_drop)} points** (allowed {g['max_accuracy_drop']:.2f}).",
            "",
        ]
    out += [
        "## Speed",
        "",
        f"Batch 1, {sp.threads} intra-op thread(s), all models in one process, {sp.warmup} warm-up runs, "
        f"{sp.rounds} interleaved rounds of {sp.runs_per_round} runs each (the first model alternates every round), "
        f"idle-thread spinning {'on' if sp.spinning else 'off'}.",
        "",
        f"{sp.cpu_line()}; onnxruntime {sp.onnxruntime_version}.",
        "",
    ]
    timed = [("fp32", sp.fp32), *([("baseline (as given)", sp.baseline)] if sp.baseline is not None else []), ("int8", sp.int8)]
    out += [
        "| | " + " | ".join(n for n, _ in timed) + " |",
        "| --- |" + " ---: |" * len(timed),
    ]
    for label, key in (("latency p50 (ms)", "latency_ms_p50"), ("latency p90 (ms)", "latency_ms_p90"), ("latency mean (ms)", "latency_ms_mean")):
        out.append(f"| {label} | " + " | ".join(_f(getattr(t, key), ".3f") for _, t in timed) + " |")
    if any(t.throughput_ips is not None for _, t in timed):
        b = next(t.throughput_batch for _, t in timed if t.throughput_batch)
        out.append(f"| throughput at batch {b} (img/s) | " + " | ".join(_f(t.throughput_ips, ".1f") for _, t in timed) + " |")
    out += ["", *speed_lines(result, bold=True, limit=g["min_speedup"])]
    if sp.note:
        out.append(f"\n> Note: {sp.note}.")
    out += [
        "",
        "## Gate checks",
        "",
        "| check | value | limit | result |",
        "| --- | ---: | ---: | --- |",
    ]
    for c in g["checks"]:
        if c["check"] == "accuracy":
            out.append(f"| accuracy drop, {c['data_set']}{' (subset)' if c.get('subset') else ''} | {_f(c['drop'])} points | <= {c['limit']:.2f} | {'pass' if c['passed'] else 'FAIL'} |")
        elif c["check"] == "speedup":
            got, need = against_limit(c["speedup"], c["limit"]) if c["speedup"] is not None and math.isfinite(c["speedup"]) else (_f(c["speedup"]), f"{c['limit']:.2f}")
            out.append(f"| speedup over {c.get('over', 'fp32')} | {got}x | >= {need}x | {'pass' if c['passed'] else 'FAIL'} |")
        else:
            out.append(f"| finite embeddings, {c['data_set']} {c['model']} | {c['nonfinite']} non-finite | 0 | FAIL |")
    versions = result.environment.get("versions", {})
    if versions:
        out += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    out.append("")
    return "\n".join(out)


# --- plot -------------------------------------------------------------------------


def plot(result: VerifyResult, path: Path) -> Path:
    """ROC curves of both models per data set; latency distributions; per-round speedup."""
    import matplotlib

    matplotlib.use("Agg")  # no display, and safe in worker threads
    import matplotlib.pyplot as plt

    sp = result.speed
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, d in enumerate(result.datasets):
        c = colors[k % len(colors)]
        for role, style in (("fp32", "-"), ("int8", "--")):
            m = getattr(d, role).metrics
            ax.plot(m.roc_fpr, m.roc_tpr, style, color=c, lw=1.5, label=f"{d.name} {role} (AUC {_f(m.roc_auc, '.4f')}, acc {_f(m.accuracy)}%)")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    # Good models hug the top: zoom the y axis to the range the curves cover from FAR 1e-4 on.
    lows = []
    for d in result.datasets:
        for role in ("fp32", "int8"):
            m = getattr(d, role).metrics
            visible = m.roc_tpr[m.roc_fpr >= 1e-4]
            if visible.size:
                lows.append(float(visible.min()))
    if lows:
        ax.set_ylim(max(0.0, np.floor((min(lows) - 0.01) * 20) / 20), 1.002)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title("ROC" + (" (SUBSET)" if result.subset else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1]
    fp, i8 = np.asarray(sp.fp32.samples_ms), np.asarray(sp.int8.samples_ms)
    lo = min(fp.min(), i8.min())
    hi = max(np.percentile(fp, 99), np.percentile(i8, 99))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 50)
    ax.hist(fp, bins=bins, alpha=0.6, label=f"fp32 p50 {sp.fp32.latency_ms_p50:.2f} ms")
    ax.hist(i8, bins=bins, alpha=0.6, label=f"int8 p50 {sp.int8.latency_ms_p50:.2f} ms")
    ax.set_xlabel(f"batch-1 latency (ms), {sp.threads} thread(s); top 1% clipped")
    ax.set_ylabel("runs")
    ax.set_title(f"latency ({sp.rounds} rounds x {sp.runs_per_round} runs per model)")
    ax.legend(fontsize=8)

    ax = axes[2]
    r = np.arange(1, len(sp.ratios) + 1)
    ratios = np.asarray(sp.ratios)
    ax.plot(r, ratios, "-", color="C0", lw=0.8, alpha=0.6)
    # Marked by which model ran first in the round: a systematic order effect shows as two bands.
    ref = "as given" if sp.baseline is not None else "fp32"
    for who, marker in (("fp32", "o"), ("int8", "s"), ("baseline", "^")):
        sel = np.array([f == who for f in sp.first_in_round], dtype=bool)
        if sel.any():
            ax.plot(r[sel], ratios[sel], marker, ms=4, ls="none", label=f"{ref} / int8, {'as given' if who == 'baseline' else who} first")
    ax.axhline(sp.speedup, color="k", lw=1.5, label=f"median {sp.speedup:.2f}x")
    ax.axhspan(*sp.speedup_iqr, color="k", alpha=0.1, label=f"IQR {sp.speedup_iqr[0]:.2f}-{sp.speedup_iqr[1]:.2f}")
    ax.axhline(result.gate["min_speedup"], color="r", ls=":", lw=1.5, label=f"gate {result.gate['min_speedup']:.2f}x")
    ax.set_xlabel("round")
    ax.set_ylabel("speedup")
    ax.set_title(f"speedup over the model as given, per round (ISA class {sp.isa_class})")
    ax.legend(fontsize=8)

    fig.suptitle(f"qpipe verify: {'PASSED' if result.passed else 'FAILED'}", fontsize=13)
    # Fixed margins: tight_layout measures every tick label and costs seconds on a busy machine.
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.11, top=0.88, wspace=0.22)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def speed_lines(result: VerifyResult, *, bold: bool = False, limit: float | None = None) -> list[str]:
    """The two speedups, each with its IQR: over the user's model as given (the gate's) and over the fastest fp32."""
    sp = result.speed
    b = "**" if bold else ""
    q25, q75 = sp.speedup_iqr
    f25, f75 = sp.speedup_fastest_fp32_iqr
    req = f"; required {limit:.2f}x" if limit is not None else ""
    over = "the user's model as given" if sp.baseline is not None else "the user's model as given (the fp32 model)"
    return [
        f"Speedup of int8 over {over}: {b}{sp.speedup:.2f}x{b} (IQR {q25:.2f}-{q75:.2f}{req}; the gate reads this one)",
        f"Speedup of int8 over the fastest fp32: {b}{sp.speedup_fastest_fp32:.2f}x{b} (IQR {f25:.2f}-{f75:.2f})",
    ]


def summary_lines(result: VerifyResult) -> list[str]:
    """What the CLI prints: one line per data set, the speed, the verdict."""
    lines: list[str] = []
    for d in result.datasets:
        f, i = d.fp32.metrics, d.int8.metrics
        sub = f" [SUBSET: first {d.pairs} of {d.total_pairs} pairs]" if d.subset else ""
        lines.append(
            f"{d.name}: fp32 {_f(f.accuracy)} +- {_f(f.accuracy_std)}%, int8 {_f(i.accuracy)} +- {_f(i.accuracy_std)}%, "
            f"drop {_f(d.accuracy_drop)} points ({d.pairs} pairs){' (fp32 embeddings cached)' if d.fp32.cached else ''}{sub}"
        )
    sp = result.speed
    given = f", as given {sp.baseline.latency_ms_p50:.2f} ms" if sp.baseline is not None else ""
    lines.append(
        f"speed: fp32 {sp.fp32.latency_ms_p50:.2f} ms{given}, int8 {sp.int8.latency_ms_p50:.2f} ms p50 at batch 1, {sp.threads} thread(s); "
        f"{sp.cpu_line()}"
    )
    lines += speed_lines(result)
    if sp.note:
        lines.append(f"note: {sp.note}")
    if result.passed:
        lines += verdict_lines(result)
    else:
        # The reasons themselves leave on stderr with the exit code (GateFailed).
        n = len(result.gate["reasons"])
        lines.append(f"FAILED: {n} gate condition{'s' if n != 1 else ''} not met")
        lines += [ln for ln in verdict_lines(result) if ln.startswith("SUBSET")]
    if result.report_dir is not None:
        lines.append(f"reports: {result.report_dir / 'report.json'}, report.md, report.png")
    return lines
