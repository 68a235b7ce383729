"""Speed-aware placement: which nodes run int8 is decided by measured latency, within the accuracy target.

Whether int8 pays depends on the kernels a CPU has. On AVX2 without VNNI,
onnxruntime's int8 depthwise convolutions (3x3, and the 1x1 ones that carry a
rewritten PRelu) run slower than its fp32 NCHWc depthwise kernel, int8 Adds
cost time that fp32 fuses into its convolutions, and int8 pointwise and full
convolutions run 1.4-1.7x faster (measured on an AMD EPYC Zen 3, AVX2 only:
benchmarks/RESULTS.md); with VNNI the
balance differs. So placement measures rather than assumes: once accuracy is
met (by the recipe's int8 or by recovery), the int8 model as built and
variants that keep node groups in fp32 (:data:`CANDIDATES`) are timed against
the fp32 model they were quantized from, interleaved in one process on real
preprocessed faces, and the fastest one within the accuracy target is kept.

Every variant is a plain run of the quantize stage with the same recipe and
calibration, its node groups added to ``quantization.nodes_to_exclude``; nodes
left between fp32 nodes with nothing to gain from int8 (a Relu or Add whose
inputs all come from fp32 nodes) go fp32 with them, so no Quantize/Dequantize
pair is spent on an island. Accuracy is scored lazily, fastest first: the
first variant within the target is the fastest one within it, and slower ones
are not scored. The int8 as built needs no score: it is what the recipe (or
recovery) already accepted.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import onnx

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, atomic_write_json
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.eval.speed import interleaved_rounds, open_for_latency
from pipeline.runtime.graph import graph_links

if TYPE_CHECKING:
    from pipeline.stages.quantize.job import Int8Job
    from pipeline.stages.quantize.stage import QuantizeResult

AS_BUILT = "as_built"
FP32 = "fp32"
# Ops whose int8 kernels are GEMMs: what stays int8 in pointwise_only.
GEMM_OPS = {"Gemm", "MatMul"}

CANDIDATES = {
    "depthwise_fp32": "every depthwise Conv (group == channels) in fp32",
    "depthwise1x1_fp32": "1x1 depthwise Convs (the PRelu rewrite's branches) in fp32",
    "pointwise_only": "every node but pointwise/full Conv, Gemm and MatMul in fp32",
}

# A round's latencies per model, in milliseconds: what a timer returns.
Timer = Callable[..., dict[str, list[float]]]
Scorer = Callable[[Path], dict[str, Any]]


# --- node groups -----------------------------------------------------------------


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def conv_kind(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> str | None:
    """``depthwise`` (one input channel per group, group > 1), ``pointwise`` (any other Conv, Gemm, MatMul) or None."""
    if node.op_type in GEMM_OPS:
        return "pointwise"
    if node.op_type != "Conv":
        return None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if group > 1 and w is not None and len(w.dims) >= 2 and w.dims[1] == 1:
        return "depthwise"
    return "pointwise"


def _kernel_1x1(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    w = inits[node.input[1]]
    return all(d == 1 for d in w.dims[2:])


def merge_islands(model: onnx.ModelProto, fp32: set[str]) -> set[str]:
    """``fp32`` and every non-GEMM node whose activation inputs all come from fp32 nodes (to a fixed point).

    Such a node in int8 would need each input quantized for one cheap kernel; in fp32 it costs nothing extra.
    """
    inits = _initializers(model)
    producer, _ = graph_links(model)
    out = set(fp32)
    changed = True
    while changed:
        changed = False
        for n in model.graph.node:
            if n.name in out or not n.name or conv_kind(n, inits) is not None:
                continue
            sources = [producer[i] for i in n.input if i and i in producer and i not in inits]
            if sources and all(s.name in out for s in sources) and not all(s.op_type == "Constant" for s in sources):
                out.add(n.name)
                changed = True
    return out


def candidate_nodes(model: onnx.ModelProto, name: str, base: list[str]) -> list[str]:
    """Node names a candidate keeps in fp32: ``base`` (the int8 as built's) plus its group and the merged islands, in graph order."""
    inits = _initializers(model)
    named = [n for n in model.graph.node if n.name]
    if name == "depthwise_fp32":
        group = {n.name for n in named if conv_kind(n, inits) == "depthwise"}
    elif name == "depthwise1x1_fp32":
        group = {n.name for n in named if conv_kind(n, inits) == "depthwise" and _kernel_1x1(n, inits)}
    elif name == "pointwise_only":
        group = {n.name for n in named if conv_kind(n, inits) != "pointwise"}
    else:
        raise UserError(f"invalid recipe: quantization.placement.candidates: unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
    keep = merge_islands(model, set(base) | group) if group else set(base)
    return [n.name for n in named if n.name in keep]


def node_placement(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, str]:
    """Where each named node of ``fp32`` ended up in ``int8``: ``int8``, ``fp32``, or ``fused`` (no node left: folded or fused by the engine).

    QOperator: a quantized node becomes ``<name>_quant`` (or a QLinear op); QDQ: it keeps its name
    between DequantizeLinear and QuantizeLinear.
    """
    by_name = {n.name: n for n in int8.graph.node}
    producer, consumers = graph_links(int8)
    out: dict[str, str] = {}
    for n in fp32.graph.node:
        if not n.name:
            continue
        q = by_name.get(n.name + "_quant")
        same = by_name.get(n.name)
        if q is not None or (same is not None and (same.op_type.startswith("QLinear") or same.op_type in ("ConvInteger", "MatMulInteger"))):
            out[n.name] = "int8"
        elif same is not None:
            first = same.input[0] if same.input else ""
            users = [u for o in same.output for u in consumers.get(o, [])]
            dq_in = first in producer and producer[first].op_type == "DequantizeLinear"
            q_out = bool(users) and all(u.op_type == "QuantizeLinear" for u in users)
            out[n.name] = "int8" if dq_in and q_out and same.op_type in ("Conv", "MatMul", "Gemm", "Add", "Mul") else "fp32"
        else:
            out[n.name] = "fused"
    return out


# --- timing ----------------------------------------------------------------------


def time_models(
    models: Mapping[str, Path],
    x: np.ndarray,
    *,
    input_name: str | None,
    output_name: str | None,
    threads: int,
    warmup: int,
    rounds: int,
    runs_per_round: int,
    progress: Progress | None = None,
    model_factory: Callable[..., Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Each model's per-round batch-1 latency (ms), timed in the same rounds by :func:`interleaved_rounds`.

    Sessions are opened once, without spinning threads; ``model_factory`` and ``clock`` are seams for tests.
    """
    progress = progress or NULL_PROGRESS
    sessions = open_for_latency(models, threads=threads, input_name=input_name, output_name=output_name, model_factory=model_factory)
    one = np.ascontiguousarray(x[:1], dtype=np.float32)
    with progress.task(f"timing fp32 and {len(sessions) - 1} int8 placements", total=warmup + rounds, unit="rounds") as task:
        timed = interleaved_rounds(sessions, one, warmup=warmup, rounds=rounds, runs_per_round=runs_per_round, clock=clock, task=task)
    return timed.rounds_ms


# --- the result --------------------------------------------------------------------


@dataclass
class Candidate:
    """One placement: what it keeps in fp32, its speed against fp32, its accuracy."""

    name: str
    description: str
    nodes_fp32: list[str]
    latency_ms: float | None = None  # median of the round figures
    speedup: float | None = None  # median over rounds of fp32 / this
    speedup_iqr: tuple[float, float] | None = None
    accuracy: dict[str, Any] | None = None  # the score, when it was scored
    within_target: bool | None = None  # None: not scored
    why_not_scored: str | None = None
    quantize_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup_iqr"] = list(self.speedup_iqr) if self.speedup_iqr else None
        return d


@dataclass
class PlacementResult:
    chosen: str
    candidates: list[Candidate]
    fp32_ms: float
    target: dict[str, Any]  # how accuracy was judged
    nodes: dict[str, dict[str, str]]  # fp32 node -> {op, placement, why}
    cpu_model: str
    isa_class: str | None
    threads: int
    rounds: int
    runs_per_round: int
    int8_pays: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "int8_pays": self.int8_pays,
            "fp32_ms": self.fp32_ms,
            "candidates": [c.to_dict() for c in self.candidates],
            "target": self.target,
            "nodes": self.nodes,
            "nodes_fp32": [k for k, v in self.nodes.items() if v["placement"] == "fp32"],
            "cpu_model": self.cpu_model,
            "isa_class": self.isa_class,
            "threads": self.threads,
            "rounds": self.rounds,
            "runs_per_round": self.runs_per_round,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
            "summary": summary(self),
        }


def _accuracy_text(c: Candidate) -> str:
    if c.accuracy is None:
        return c.why_not_scored or "not scored"
    a = c.accuracy
    verdict = "within" if c.within_target else "OUTSIDE"
    by = " (recovery's score)" if a.get("by") == "recovery" else ""
    if a.get("confirm_drop") is not None:
        return f"drop {a['drop']:+.2f} on {a['pairs']} pairs, {a['confirm_drop']:+.2f} on {a['confirm_pairs']}{by}: {verdict} the target"
    if "drop" in a:
        return f"drop {a['drop']:+.2f} on {a['pairs']} pairs{by}: {verdict} the target"
    return f"embedding cosine to fp32 {a['cosine_mean']:.5f} on {a['faces']} faces: {verdict} the target"


def summary(res: PlacementResult) -> list[str]:
    """What ``qpipe quantize`` prints: the chosen placement, every alternative measured, the CPU."""
    lines = [
        f"placement: batch-1 latency on {res.cpu_model} (ISA class {res.isa_class or 'none'}), {res.threads} threads, "
        f"{res.rounds} interleaved rounds x {res.runs_per_round} runs, a real preprocessed face; speedup = median fp32/int8 ratio [IQR]",
        f"  {'fp32':<18} {res.fp32_ms:8.2f} ms  1.00x",
    ]
    for c in res.candidates:
        mark = "*" if c.name == res.chosen else " "
        speed = f"{c.latency_ms:8.2f} ms  {c.speedup:.2f}x [{c.speedup_iqr[0]:.2f}, {c.speedup_iqr[1]:.2f}]" if c.speedup is not None else "not timed"
        lines.append(f"{mark} {c.name:<18} {speed}  fp32 nodes {len(c.nodes_fp32)}; {_accuracy_text(c)}")
    chosen = res.candidate(res.chosen)
    lines.append(f"placement chosen: {res.chosen} ({chosen.description})")
    if not res.int8_pays:
        lines.append(
            f"placement: NO int8 placement measured faster than fp32 on this CPU (best {max((c.speedup or 0) for c in res.candidates):.2f}x): "
            "the int8 model is slower than its fp32 here and the gate's min_speedup will fail"
        )
    lines += [f"warning: {w}" for w in res.warnings]
    return lines


def choose(candidates: list[Candidate], score: Callable[[Candidate], None]) -> Candidate:
    """The fastest candidate within the accuracy target, scoring fastest first and stopping at the first within it.

    The int8 as built counts as within the target without a score unless it was scored
    (it is what the recipe or recovery accepted); a candidate outside the target is never chosen.
    """
    order = sorted(candidates, key=lambda c: -(c.speedup if c.speedup is not None else -1.0))
    for i, c in enumerate(order):
        if c.within_target is None and c.name != AS_BUILT:
            score(c)
        if c.within_target or (c.name == AS_BUILT and c.within_target is None):
            for later in order[i + 1 :]:
                if later.within_target is None and later.why_not_scored is None and later.name != AS_BUILT:
                    later.why_not_scored = f"not scored: slower than {c.name}"
            return c
    # Nothing within the target, not even the int8 as built: keep what the recipe or recovery gave.
    return next(c for c in candidates if c.name == AS_BUILT)


# --- the step --------------------------------------------------------------------


def place(
    job: "Int8Job",
    *,
    base: "QuantizeResult",
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    timer: Timer | None = None,
    scorer: Scorer | None = None,
) -> "tuple[QuantizeResult, PlacementResult]":
    """Measure the int8 model at ``job.out`` (``base``, as the recipe or recovery built it) against variants; keep the fastest within the target.

    ``job.model`` (the converted fp32 model ``base`` was quantized from) is timed as the fp32
    reference; ``job.quantization`` is the recipe's section, its ``placement`` says which
    candidates and how long to time. Candidates are scored on recovery's evaluation subset of
    ``job.pairs`` when that is a .bin; without pairs the embedding cosine to fp32 decides.

    Args:
        job: what was quantized and how (:class:`~pipeline.stages.quantize.job.Int8Job`).
        base: the quantize result of the int8 model at ``job.out``; its ``recovery`` section, when
            recovery ran, gives the fp32 model and settings it was quantized with and its accuracy.
        cache_dir: fp32 embedding cache shared with ``qpipe verify`` (same key), or None.
        progress: progress bars and notes.
        timer, scorer: seams for tests (:func:`time_models`'s signature; path -> score dict with
            ``drop`` or ``cosine_mean``).

    Returns the quantize result of the model now at ``job.out`` (its ``placement`` set) and the placement.
    """
    from pipeline.accuracy.recover import candidate_settings, check_recovery
    from pipeline.core.environment import cpu_info, detect_cpu_class, physical_cores
    from pipeline.data.bins import VerificationBin, open_images
    from pipeline.recipe import VerifySection
    from pipeline.runtime.graph import find_input, find_output, load_model
    from pipeline.stages.quantize.stage import quantize

    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    quantization, model, out, input_spec = job.quantization, job.model, job.out, job.input_spec
    pl = quantization.placement
    vs = job.recipe.verify if job.recipe is not None else VerifySection()
    threads = vs.threads or physical_cores()
    rec = base.recovery or {}

    # What the int8 as built was quantized from, and with which settings (recovery may have changed both).
    fp32_src = Path(rec["repaired_model"]["path"]) if rec.get("repaired_model") else model
    changes = {k.split(".")[-1]: v for k, v in (rec.get("recipe_changes") or {}).items()}
    q_base = candidate_settings(quantization, **changes)
    q_base = q_base.model_copy(update={"placement": q_base.placement.model_copy(update={"enabled": False})})

    source = load_model(model, "fp32 model")
    input_name = find_input(source, input_spec.name).name
    output_name = find_output(source, input_spec.output).name
    built = load_model(fp32_src, "fp32 model")

    candidates = [Candidate(AS_BUILT, "the int8 model as the recipe" + (" and recovery" if rec else "") + " built it", list(q_base.nodes_to_exclude))]
    warnings: list[str] = []
    seen = {tuple(sorted(q_base.nodes_to_exclude)): AS_BUILT}
    for name in dict.fromkeys(pl.candidates):
        nodes = candidate_nodes(built, name, list(q_base.nodes_to_exclude))
        key = tuple(sorted(nodes))
        if key in seen:
            warnings.append(f"placement candidate {name} keeps the same nodes in fp32 as {seen[key]}: not measured twice")
            continue
        seen[key] = name
        candidates.append(Candidate(name, CANDIDATES[name], nodes))

    work = Path(tempfile.mkdtemp(prefix=".qpipe-placement-", dir=out.parent))
    try:
        # The int8 as built is copied: the chosen candidate may replace the file at ``out``.
        paths: dict[str, Path] = {AS_BUILT: work / AS_BUILT / "int8.onnx"}
        paths[AS_BUILT].parent.mkdir()
        shutil.copyfile(base.output, paths[AS_BUILT])
        results: dict[str, "QuantizeResult"] = {AS_BUILT: base}
        for c in candidates[1:]:
            q = q_base.model_copy(update={"nodes_to_exclude": c.nodes_fp32})
            progress.log(f"placement: quantizing {c.name} ({c.description}: {len(c.nodes_fp32)} nodes in fp32)")
            tq = time.perf_counter()
            results[c.name] = quantize(job.with_quantization(q, model=fp32_src, out=work / c.name / "int8.onnx"), progress=progress)
            c.quantize_seconds = time.perf_counter() - tq
            paths[c.name] = Path(results[c.name].output)

        # Speed: every model in the same rounds, on a real preprocessed face.
        from pipeline.data.preprocess import preprocess

        faces = open_images(job.calib)
        x = preprocess(faces.decode_many([0]), input_spec)
        per_round = (timer or time_models)(
            {FP32: model, **paths}, x, input_name=input_name, output_name=output_name, threads=threads, warmup=pl.warmup,
            rounds=pl.rounds, runs_per_round=pl.runs_per_round, progress=progress,
        )
        fp32_rounds = np.asarray(per_round[FP32])
        for c in candidates:
            mine = np.asarray(per_round[c.name])
            ratios = fp32_rounds / np.maximum(mine, 1e-12)
            q25, q50, q75 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
            c.latency_ms, c.speedup, c.speedup_iqr = float(np.median(mine)), q50, (q25, q75)

        # Accuracy, as recovery defines it when there are pairs; else the embedding cosine to fp32.
        ev_source = open_images(job.pairs)
        rec_target = check_recovery(job) if isinstance(ev_source, VerificationBin) else None
        confirm: Scorer | None = None
        if scorer is None:
            scorer, confirm, target = _default_scorer(
                job, ev_source, rec_target, vs, threads=threads, input_name=input_name, output_name=output_name, cache_dir=cache_dir,
                progress=progress,
            )
        else:
            target = {"kind": "drop", "max_accuracy_drop": rec_target} if rec_target is not None else {"kind": "cosine"}
        as_built = candidates[0]
        if rec:
            final_attempt = next((a for a in rec.get("attempts", []) if a.get("label") == rec.get("final")), None)
            as_built.within_target = bool(rec.get("within_target"))
            if final_attempt is not None:
                as_built.accuracy = {"drop": final_attempt["drop"], "pairs": rec.get("eval_pairs"), "by": "recovery",
                                     "confirm_drop": final_attempt.get("confirm_drop"), "confirm_pairs": final_attempt.get("confirm_pairs")}
        if target["kind"] == "cosine":
            as_built.accuracy = scorer(paths[AS_BUILT])
            as_built.within_target = True
            target["min_cosine_mean"] = as_built.accuracy["cosine_mean"] - pl.cosine_tolerance
        elif not rec:
            as_built.why_not_scored = "not scored: the recipe's int8 (the verify gate checks it)"

        def score(c: Candidate) -> None:
            progress.log(f"placement: scoring {c.name} ({c.speedup:.2f}x fp32)")
            c.accuracy = scorer(paths[c.name])
            if target["kind"] == "drop":
                c.within_target = c.accuracy["drop"] <= target["max_accuracy_drop"] + 1e-9
                if c.within_target and confirm is not None:
                    # As recovery does: a subset cannot certify a 0.1-point target; the gate's pairs decide.
                    full = confirm(paths[c.name])
                    c.accuracy.update(confirm_pairs=full["pairs"], confirm_drop=full["drop"], confirm_accuracy=full["accuracy"])
                    c.within_target = full["drop"] <= target["max_accuracy_drop"] + 1e-9
            else:
                c.within_target = c.accuracy["cosine_mean"] >= target["min_cosine_mean"] - 1e-9

        chosen = choose(candidates, score)
        if chosen.name != AS_BUILT:
            with atomic_path(out) as tmp:
                shutil.copyfile(paths[chosen.name], tmp)
        final = results[chosen.name]
        placement = node_placement(source, onnx.load(str(paths[chosen.name])))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = cpu_info()
    base_nodes = set(quantization.nodes_to_exclude)
    recovered = set(q_base.nodes_to_exclude) - base_nodes
    nodes: dict[str, dict[str, str]] = {}
    for n in source.graph.node:
        if not n.name:
            continue
        where = placement.get(n.name, "fused")
        if n.name in base_nodes:
            why = "recipe: quantization.nodes_to_exclude"
        elif n.name in recovered:
            why = "recovery: back in fp32 for accuracy"
        elif n.name in chosen.nodes_fp32:
            why = f"placement: {chosen.name} ({chosen.speedup:.2f}x fp32, {_accuracy_text(chosen)})"
        elif where == "int8":
            why = f"int8 in {chosen.name}"
        elif where == "fused":
            why = "folded or fused into a neighbour by the engine"
        else:
            why = "the engine has no int8 form for it here"
        nodes[n.name] = {"op": n.op_type, "placement": where, "why": why}
    result = PlacementResult(
        chosen=chosen.name, candidates=candidates, fp32_ms=float(np.median(fp32_rounds)), target=target, nodes=nodes,
        cpu_model=str(cpu.get("model")), isa_class=detect_cpu_class().detected, threads=threads, rounds=pl.rounds,
        runs_per_round=pl.runs_per_round, int8_pays=(chosen.speedup or 0.0) > 1.0, seconds=time.perf_counter() - t0,
        warnings=warnings,
    )
    section = result.to_dict()
    final = dataclasses.replace(final, output=out, recovery=base.recovery, placement=section)
    if rec.get("report"):
        # recovery.json says where each node ended up too.
        report = Path(rec["report"]).with_suffix(".json")
        if report.is_file():
            import json

            data = json.loads(report.read_text(encoding="utf-8"))
            data["placement"] = section
            atomic_write_json(report, data)
    return final, result


def _default_scorer(
    job: "Int8Job", ev_source: Any, rec_target: float | None, vs: Any, *, threads: int, input_name: str, output_name: str,
    cache_dir: Any, progress: Progress,
) -> tuple[Scorer, Scorer | None, dict[str, Any]]:
    """Recovery's evaluator (its subset, its confirmation on the gate's pairs) when there are pairs; else the mean
    embedding cosine to fp32 on 64 calibration faces. The evaluator is built on first use: a placement whose fastest
    candidate is the int8 as built scores nothing."""
    from pipeline.accuracy.evaluator import Evaluator, subset_pairs
    from pipeline.accuracy.ranges import calibration_images
    from pipeline.runtime.session import OnnxModel

    model, quantization, spec = job.model, job.quantization, job.input_spec

    if rec_target is not None:
        pairs = subset_pairs(ev_source.num_pairs, quantization.recovery.eval_pairs, vs.folds)
        confirm_pairs = (vs.pairs or ev_source.num_pairs) if quantization.recovery.confirm else None
        target: dict[str, Any] = {"kind": "drop", "max_accuracy_drop": rec_target, "pairs": pairs, "confirm_pairs": confirm_pairs}
        made: list[Evaluator] = []

        def evaluator() -> Evaluator:
            if not made:
                made.append(Evaluator(
                    model, ev_source, spec, pairs=pairs, confirm_pairs=confirm_pairs, folds=vs.folds, flip=vs.flip, batch=vs.batch,
                    threads=threads, cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress,
                ))
                target["fp32_accuracy"] = made[0].fp32.accuracy
            return made[0]

        def confirm(p: Path) -> dict[str, Any]:
            return evaluator().score(p, confirm=True)

        return (lambda p: evaluator().score(p)), (confirm if confirm_pairs and confirm_pairs > pairs else None), target

    images = calibration_images(job.calib, spec, job.calibration, input_name)[:64]

    def embed(path: Path) -> np.ndarray:
        m = OnnxModel(path, threads=threads, input_name=input_name, output_name=output_name)
        rows = np.concatenate([np.asarray(v[0], dtype=np.float32).reshape(k, -1) for k, v in m.batches(images, 16, names=[output_name])])
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    ref = embed(model)

    def cosine(path: Path) -> dict[str, Any]:
        cos = np.sum(embed(path) * ref, axis=1)
        return {"faces": len(ref), "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos))}

    return cosine, None, {"kind": "cosine", "faces": len(images)}
