"""MODEL_CARD.md for an artifact directory, generated from its manifest and verify report.

The card says what the int8 model is and where it came from (source, sha256,
licence), what it is for and where it must not be trusted, how fp32 and int8
compare on every verification set, what machine and libraries produced the
figures, and the exact command that rebuilds it. Pure: dicts in, Markdown out.
"""

from __future__ import annotations

from typing import Any

INTENDED_USE = """\
1:1 face verification: embed two aligned face crops (the five-point ArcFace alignment, the input size
above) and compare the L2-normalised embeddings (cosine similarity, or squared L2 distance against the
threshold the report gives). It is the same model as its fp32 source, quantized to 8-bit integers for
faster CPU inference; use it where the fp32 model's accuracy on *your* faces has been established and
the accuracy drop measured here is acceptable."""

LIMITS = """\
- **Evaluation data.** The figures come only from the verification sets listed below. LFW is a research
  data set of web photographs of public figures, mostly frontal and well lit; its own authors caution that
  many groups are poorly represented (very few children, very few people over 80, a small proportion of
  women, and many ethnicities barely or not at all). Accuracy near 99.5% on LFW does not carry over to
  other populations, cameras, poses, lighting or image quality. LFW is for evaluation and research only.
- **Bias.** Face-recognition models, this one included, have measured error rates that differ between
  demographic groups. Neither the fp32 nor the int8 model was evaluated per group here; quantization can
  shift errors unevenly even when the mean accuracy barely changes. Measure on data that represents the
  people the system will see before deploying it.
- **Not for** identifying people at scale, surveillance, or any decision with legal or similarly
  significant effects on a person without human review, consent and a lawful basis.
- **Inputs.** Embeddings are only meaningful for faces aligned the way the training data was (112x112
  five-point similarity transform); unaligned or non-face images give confident-looking but meaningless
  similarities.
- **Speed.** The speedup was measured on the CPU named below with the thread count given; int8 gains
  depend on CPU features (VNNI/AMX) and differ on other machines."""


def _pct(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "n/a"


def _metrics_table(report: dict[str, Any]) -> list[str]:
    lines = ["| data set | metric | fp32 | int8 | int8 - fp32 |", "| --- | --- | --- | --- | --- |"]
    rows = [
        ("accuracy (%)", "accuracy", _pct),
        ("accuracy std over folds (%)", "accuracy_std", _pct),
        ("mean best threshold (squared L2)", "threshold_mean", lambda v: _num(v, "{:.3f}")),
        ("TAR at FAR=1e-3 (%)", "tar_at_far", _pct),
        ("ROC AUC", "roc_auc", _num),
    ]
    for name, ds in (report.get("data") or {}).items():
        label = name + (f" (subset: first {ds.get('pairs')} of {ds.get('total_pairs')} pairs)" if ds.get("subset") else f" ({ds.get('pairs')} pairs)")
        f32, i8 = ds.get("fp32") or {}, ds.get("int8") or {}
        for title, key, fmt in rows:
            a, b = f32.get(key), i8.get(key)
            diff = fmt(b - a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "n/a"
            lines.append(f"| {label} | {title} | {fmt(a)} | {fmt(b)} | {diff} |")
    f32, i8 = report.get("fp32") or {}, report.get("int8") or {}
    lines.append(f"| speed | latency at batch 1, median (ms) | {_num(f32.get('latency_ms_p50'), '{:.3f}')} | {_num(i8.get('latency_ms_p50'), '{:.3f}')} | |")
    if f32.get("throughput_ips") is not None or i8.get("throughput_ips") is not None:
        batch = f32.get("throughput_batch") or i8.get("throughput_batch")
        lines.append(
            f"| speed | throughput at batch {batch} (images/s) | {_num(f32.get('throughput_ips'), '{:.1f}')} | {_num(i8.get('throughput_ips'), '{:.1f}')} | |"
        )
    for key, title in (
        ("speedup", "int8 speedup over the model as given (median of interleaved rounds; the gate's)"),
        ("speedup_fastest_fp32", "int8 speedup over the fastest fp32 (median of interleaved rounds)"),
    ):
        if key != "speedup" and report.get(key) is None:
            continue
        iqr = report.get(f"{key}_iqr") or []
        spread = f" (IQR {iqr[0]:.2f}-{iqr[1]:.2f})" if len(iqr) == 2 and all(isinstance(x, (int, float)) for x in iqr) else ""
        lines.append(f"| speed | {title} | | {_num(report.get(key), '{:.2f}')}x{spread} | |")
    cpu = report.get("speed_cpu") or {}
    if cpu:
        lines.append(f"| speed | measured on | | {cpu.get('model', 'unknown')}, ISA class {cpu.get('isa_class') or 'none'} | |")
    return lines


def _environment(manifest: dict[str, Any], report: dict[str, Any]) -> list[str]:
    env = manifest.get("environment") or {}
    cpu = env.get("cpu") or {}
    flags = cpu.get("flags") or {}
    present = [k for k, v in flags.items() if v]
    absent = [k for k, v in flags.items() if not v]
    versions = env.get("versions") or {}
    threads = (report.get("environment") or {}).get("threads")
    git = (manifest.get("qpipe") or {}).get("git") or {}
    lines = [
        f"- CPU: {cpu.get('model', 'unknown')} ({cpu.get('physical_cores', '?')} physical / {cpu.get('logical_cores', '?')} logical cores)",
        f"- int8-relevant CPU flags present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}",
        f"- timing threads: {threads if threads is not None else 'n/a'}",
        f"- OS: {env.get('os', 'unknown')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    ]
    if git.get("commit"):
        lines.append(f"- qpipe commit: `{git['commit']}`" + (" (with uncommitted changes)" if git.get("dirty") else ""))
    note = report.get("speed_note")
    if note:
        lines.append(f"- note: {note}")
    return lines


def render_model_card(manifest: dict[str, Any], report: dict[str, Any] | None) -> str:
    """The Markdown card. ``manifest``: the artifact manifest's content (``files`` may be absent)."""
    report = report or {}
    recipe = (manifest.get("recipe") or {}).get("resolved") or {}
    model = recipe.get("model") or {}
    inp = model.get("input") or {}
    q = recipe.get("quantization") or {}
    cal = recipe.get("calibration") or {}
    inputs = manifest.get("inputs") or {}
    src, data = inputs.get("model") or {}, inputs.get("data") or {}
    gate = manifest.get("gate") or report.get("gate") or {}
    stages = manifest.get("stages") or {}
    outputs = {}
    for st in stages.values():
        outputs.update(st.get("outputs") or {})
    files = manifest.get("files") or {}
    int8_sha = (files.get("int8.onnx") or {}).get("sha256") or outputs.get("int8.onnx") or "see manifest.json"
    fp32_sha = (files.get("fp32.onnx") or {}).get("sha256") or outputs.get("fp32.onnx") or "see manifest.json"
    name = manifest.get("name") or recipe.get("name", "model")
    git = (manifest.get("qpipe") or {}).get("git") or {}
    created = manifest.get("created") or {}
    converted = (stages.get("convert") or {}).get("result") or {}
    in_name = inp.get("name") or converted.get("input_name") or "first input"
    out_name = inp.get("output") or converted.get("output_name") or "first output"
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    licence = model.get("license") or "not stated in the recipe (set `model.license`); check the source's terms before use"

    out = [
        f"# Model card: {name} (int8)",
        "",
        f"Built by qpipe {(manifest.get('qpipe') or {}).get('version', '?')} on {created.get('finished_at') or created.get('started_at') or '?'}; "
        f"verification gate **{verdict}**.",
        "",
        "## Model",
        "",
    ]
    if model.get("description"):
        out += [model["description"], ""]
    out += [
        f"- Source: {src.get('source', ', '.join(model.get('urls') or []))}" + (f" (member `{src['member']}`)" if src.get("member") else ""),
        f"- Source sha256: `{src.get('sha256', '?')}` ({'pinned in the recipe' if src.get('pinned') else 'recorded, not pinned in the recipe'})",
        f"- Licence of the weights: {licence}. The int8 model is derived from them and carries the same terms.",
        f"- Input: `{in_name}`, {inp.get('layout', 'NCHW')} {inp.get('channels', 'RGB')}, "
        f"{'x'.join(str(s) for s in inp.get('size') or [])}, pixels {'0..255 (normalisation inside the graph)' if inp.get('scale') == 'raw' else 'as (x - mean) / std'}; "
        f"output `{out_name}`: the face embedding.",
        f"- Conversion: opset {recipe.get('convert', {}).get('opset', '?')}, dynamic batch {recipe.get('convert', {}).get('dynamic_batch')}.",
        f"- Quantization: {q.get('engine')} post-training static, {q.get('format')}, "
        f"{'per-channel' if q.get('per_channel') else 'per-tensor'} weights, {q.get('calibration_method')} calibration on "
        f"{cal.get('samples')} images (seed {cal.get('seed')}) of the verification data.",
        f"- Files: `int8.onnx` sha256 `{int8_sha}`; `fp32.onnx` (converted source) sha256 `{fp32_sha}`. "
        "Every file's hash is in `manifest.json` (`qpipe manifest verify DIR`).",
        "",
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        "## Limits",
        "",
        LIMITS,
        "",
        "## Metrics: fp32 vs int8",
        "",
        f"Verification data: {data.get('source', '?')}" + (f" (member `{data['member']}`)" if data.get("member") else "")
        + f", sha256 `{data.get('sha256', '?')}`. Protocol: insightface 10-fold LFW-style verification "
        "(image + flip embeddings summed, L2-normalised, squared L2 distance, thresholds chosen on 9 folds).",
        "",
    ]
    if report:
        out += _metrics_table(report)
    else:
        out.append("No verification report was produced.")
    out += [
        "",
        f"Gate: int8 accuracy >= fp32 accuracy - {_num(gate.get('max_accuracy_drop'), '{:g}')} points on every set, "
        f"and speedup >= {_num(gate.get('min_speedup'), '{:g}')}x: **{verdict}**.",
    ]
    out += [f"- {r}" for r in gate.get("reasons") or []]
    out += ["", "## Environment", "", *_environment(manifest, report), "", "## Reproduce", ""]
    out += [
        "From a clone of qpipe" + (f" at commit `{git['commit']}`" if git.get("commit") else "") + ":",
        "",
        "```bash",
        *([f"git checkout {git['commit']}"] if git.get("commit") else []),
        "pip install -e .",
        manifest.get("command") or "qpipe run --recipe recipe.yaml",
        "```",
        "",
        "`recipe.yaml` in this directory is the resolved recipe with both inputs pinned by sha256: "
        "`qpipe run --recipe recipe.yaml` rebuilds the same int8 bytes on the same machine and library versions "
        f"(int8 sha256 `{int8_sha}`).",
        "",
    ]
    return "\n".join(out)
