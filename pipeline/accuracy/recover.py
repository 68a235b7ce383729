"""Accuracy recovery: when int8 misses the target, repair the cause, then fall back nodes to fp32.

The order follows the cost to the user. First the int8 model the recipe asks
for is scored on an evaluation subset (whole folds of the verification pairs,
the insightface protocol, :mod:`pipeline.accuracy.evaluator`). If it misses
the target the model is diagnosed (:mod:`pipeline.accuracy.diagnose`) and
root causes are repaired where the function stays the same and the engine
allows (:mod:`pipeline.accuracy.repairs`): cross-layer equalisation of
outlier channels, zeroed near-dead channels, and engine settings kept only if
they add accuracy. Every rewrite is checked: the repaired fp32 model must give
the same embeddings as the original (cosine >= ``convert.min_cosine`` on
calibration faces). Then, if still needed, nodes go back to fp32 greedily
(``quantization.nodes_to_exclude``), steered by the diagnosis's simulation
(:mod:`pipeline.accuracy.fallback`). A candidate that meets the target on the
subset is re-checked on the pairs the verify gate uses (``recovery.confirm``):
a 1,200-pair subset cannot certify a 0.1-point target on its own. Recovery
stops at the first candidate within the target; the result names what was
repaired, which nodes stayed fp32, each attempt's accuracy, the latency cost,
and the recipe keys that reproduce the int8 model.

Every candidate is a plain run of the quantize stage. Recovery writes the
chosen int8 model, its reports and the repaired fp32 model; the manifest
beside them is the caller's (:mod:`pipeline.build.int8`), from the returned
result.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from pipeline.accuracy.diagnose import Analysis, DiagnoseResult, analyse, write_report
from pipeline.accuracy.evaluator import Evaluator, subset_pairs
from pipeline.accuracy.fallback import greedy_fallback
from pipeline.accuracy.findings import Finding, int8_model_findings
from pipeline.accuracy.ranges import calibration_images
from pipeline.accuracy.recovery_report import Attempt, RecoverResult, markdown
from pipeline.accuracy.repairs import Repair, equivalence_check, plan_repairs
from pipeline.accuracy.simulate import sensitivity
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_path, atomic_write_json, atomic_write_text, require_file
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.stages.quantize.job import Int8Job
from pipeline.stages.quantize.scheme import QuantScheme
from pipeline.stages.quantize.stage import quantize

if TYPE_CHECKING:
    from pipeline.recipe import QuantizationSection
    from pipeline.stages.quantize.stage import QuantizeResult


def candidate_settings(q: "QuantizationSection", **changes: Any) -> "QuantizationSection":
    """A copy of the section with ``changes`` and recovery off: what quantizing a candidate takes, and what reproduces it."""
    data = q.model_dump(mode="python")
    data.update(changes)
    data["recovery"] = {**data["recovery"], "enabled": False}
    return type(q).model_validate(data)


@dataclass
class _Setup:
    """Everything one recovery run needs, resolved from the job and the recipe."""

    job: Int8Job  # as handed to recover: its quantization is the recipe's
    source: onnx.ModelProto
    q0: "QuantizationSection"  # the recipe's settings, recovery off
    input_name: str
    output_name: str
    target: float
    min_cosine: float
    threads: int
    verify: Any
    work: Path
    report_dir: Path
    repaired_path: Path
    progress: Progress


class _Recovery:
    """One recovery run: the candidates so far and the steps that make new ones."""

    def __init__(self, setup: _Setup, evaluator: Evaluator) -> None:
        self.s = setup
        self.rec = setup.q0.recovery
        self.evaluator = evaluator
        self.attempts: list[Attempt] = []
        self.paths: list[Path] = []  # int8 file of each attempt
        self.settings: list[tuple[Path, "QuantizationSection"]] = []  # fp32 model and settings of each attempt
        self.results: list["QuantizeResult"] = []  # what quantize returned for each attempt
        self.repair_sets: list[list[Repair]] = []  # repairs each attempt carries
        self.warnings: list[str] = []
        self.diagnosis: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}  # seconds per phase (attempts carry their own)
        self._images: np.ndarray | None = None

    @property
    def target(self) -> float:
        return self.s.target

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            job = self.s.job
            self._images = calibration_images(job.calib, job.input_spec, job.calibration, self.s.input_name)
        return self._images

    def analyse(self, model: onnx.ModelProto, q: "QuantizationSection") -> Analysis:
        return analyse(
            model, self.images, QuantScheme.from_section(q), input_name=self.s.input_name, output_name=self.s.output_name,
            progress=self.s.progress,
        )

    # -- candidates --
    def candidate(
        self, label: str, fp32: Path, q: "QuantizationSection", repairs: list[Repair], *, simulated: float | None = None,
        existing: "QuantizeResult | None" = None,
    ) -> Attempt:
        """Quantize (unless ``existing``), score on the evaluation subset, record."""
        t0 = time.perf_counter()
        if existing is not None:
            qres = existing
        else:
            path = self.s.work / f"candidate{len(self.attempts)}" / "int8.onnx"
            qres = quantize(self.s.job.with_quantization(q, model=fp32, out=path), progress=self.s.progress)
        path = Path(qres.output)
        score = self.evaluator.score(path)
        k = len(self.attempts)
        a = Attempt(
            label=label, nodes_fp32=list(q.nodes_to_exclude), repairs=[r.kind for r in repairs],
            settings={"per_channel": q.per_channel, "reduce_range": q.reduce_range, "calibration_method": q.calibration_method},
            accuracy=score["accuracy"], accuracy_std=score["accuracy_std"], drop=score["drop"],
            within_target=score["drop"] <= self.target + 1e-9, cosine_mean=score["cosine_mean"], cosine_min=score["cosine_min"],
            simulated_error=simulated, seconds=0.0,
        )
        self.s.progress.log(
            f"recovery attempt {k} ({label}): accuracy {a.accuracy:.2f} on {score['pairs']} pairs, drop {a.drop:+.2f} "
            f"(target {self.target:g}), embedding cosine {a.cosine_mean:.5f}"
        )
        if a.within_target and self.evaluator.confirm_pairs:
            full = self.evaluator.score(path, confirm=True)
            a.confirm_pairs, a.confirm_accuracy, a.confirm_drop = full["pairs"], full["accuracy"], full["drop"]
            a.within_target = full["drop"] <= self.target + 1e-9
            self.s.progress.log(
                f"recovery attempt {k} on the gate's {full['pairs']} pairs: accuracy {full['accuracy']:.2f}, drop {full['drop']:+.2f}"
                + ("" if a.within_target else ": misses the target there, continuing")
            )
        a.seconds = time.perf_counter() - t0
        self.attempts.append(a)
        self.paths.append(path)
        self.settings.append((fp32, q))
        self.results.append(qres)
        self.repair_sets.append(list(repairs))
        return a

    def best(self) -> int:
        within = [i for i, a in enumerate(self.attempts) if a.within_target]
        if within:
            return within[0]
        return min(range(len(self.attempts)), key=lambda i: (self.attempts[i].best_drop, len(self.attempts[i].nodes_fp32)))

    # -- steps --
    def diagnose(self) -> tuple[Analysis, list[Finding]]:
        """Findings and sensitivity of the recipe's int8, written as diagnose.json/.md."""
        t0 = time.perf_counter()
        an = self.analyse(self.s.source, self.s.q0)
        findings = list(an.findings) + int8_model_findings(onnx.load(str(self.paths[0])), self.s.source, an.nodes)
        sim = an.simulator(self.rec.sensitivity_samples)
        rows, err_all = sensitivity(sim, both=False, progress=self.s.progress)
        self.attempts[0].simulated_error = err_all
        res = DiagnoseResult(
            fp32=self.s.job.model, int8=None, scheme=an.scheme.to_dict(), samples=len(sim.images), range_samples=len(self.images),
            quantizable=len(an.nodes), error_all=err_all, sensitivity=rows, findings=findings, seconds=0.0,
        )
        res.seconds = time.perf_counter() - t0
        write_report(res, self.s.report_dir)
        self.diagnosis = {k: v for k, v in res.to_dict().items() if k not in ("fp32", "int8")}
        self.timings["diagnosis"] = res.seconds
        return an, findings

    def repair(self, an: Analysis, findings: list[Finding]) -> tuple[int, Analysis]:
        """Try the repairs; returns the attempt the fp32 fallback should start from, and its analysis."""
        s = self.s
        check = equivalence_check(
            s.source, self.images[: self.rec.sensitivity_samples], input_name=s.input_name, output_name=s.output_name
        )
        repaired, repairs, notes = plan_repairs(
            s.source, findings, an.stats, an.scheme, s.q0, check=check, min_cosine=s.min_cosine, progress=s.progress
        )
        self.warnings += notes
        model_repairs = [x for x in repairs if not x.setting]
        changes: dict[str, Any] = {}
        for x in repairs:
            changes.update({k.split(".")[-1]: v for k, v in x.setting.items()})
        fp32 = s.job.model
        if model_repairs:
            with atomic_path(s.repaired_path) as tmp:
                onnx.save(repaired, str(tmp))
            fp32 = s.repaired_path
        # Function-preserving rewrites first; engine settings on top, kept only if they add accuracy.
        options = []
        if model_repairs:
            options.append(("repaired", s.q0, model_repairs, repaired))
        if changes:
            label = "repaired + settings" if model_repairs else "settings"
            options.append((label, candidate_settings(s.q0, **changes), repairs, repaired if model_repairs else s.source))
        current, current_model = 0, s.source
        for label, q, reps, proto in options:
            a = self.candidate(label, fp32 if proto is repaired else s.job.model, q, reps)
            if a.accuracy > self.attempts[current].accuracy or (a.within_target and not self.attempts[current].within_target):
                current, current_model = len(self.attempts) - 1, proto
            if a.within_target:
                return current, an
        if options and current == 0:
            self.warnings.append("the repairs did not raise accuracy on the evaluation subset; the fp32 fallback starts from the recipe's int8")
        if current == 0:
            return 0, an
        return current, self.analyse(current_model, self.settings[current][1])

    def fallback(self, start: int, an: Analysis) -> None:
        fp32, q = self.settings[start]
        repairs = self.repair_sets[start]

        def try_nodes(names: list[str], simulated: float) -> Attempt:
            settings = candidate_settings(q, nodes_to_exclude=list(q.nodes_to_exclude) + names)
            return self.candidate("fp32: " + ", ".join(names), fp32, settings, repairs, simulated=simulated)

        self.timings["fallback_ranking"] = greedy_fallback(
            an, q.nodes_to_exclude, self.attempts[start], try_nodes, target=self.target, limit=self.rec.max_fp32_nodes,
            samples=self.rec.sensitivity_samples, progress=self.s.progress,
        )

    def finish(self, t0: float) -> RecoverResult:
        """Write the chosen candidate to the job's ``out`` and the reports."""
        s = self.s
        quantization, out = s.job.quantization, s.job.out
        chosen = self.best()
        final = self.attempts[chosen]
        final_fp32, final_q = self.settings[chosen]
        if not final.within_target:
            self.warnings.append(
                f"no candidate reached the target drop of {self.target:g} points on the evaluation subset; "
                f"kept the best ({final.label}: drop {final.drop:+.2f})"
            )
        same_kernels = final_q.nodes_to_exclude == self.settings[0][1].nodes_to_exclude
        t_speed = time.perf_counter()
        speed = _speed(s, self.paths[0], self.paths[chosen], self.evaluator.bin, same_kernels=same_kernels)
        self.timings["speed"] = time.perf_counter() - t_speed
        self.timings["attempts"] = sum(a.seconds for a in self.attempts)
        changes: dict[str, Any] = {}
        for key in ("nodes_to_exclude", "per_channel", "reduce_range", "calibration_method"):
            if getattr(final_q, key) != getattr(quantization, key):
                changes[f"quantization.{key}"] = getattr(final_q, key)
        with atomic_path(out) as tmp:
            shutil.copyfile(self.paths[chosen], tmp)
        keep_repaired = final_fp32 == s.repaired_path
        res = RecoverResult(
            output=out, target=self.target, eval_pairs=self.evaluator.pairs, total_pairs=self.evaluator.bin.num_pairs,
            fp32_accuracy=self.evaluator.fp32.accuracy, within_target=final.within_target, attempts=self.attempts, final=final,
            repairs=self.repair_sets[chosen], nodes_fp32=list(final_q.nodes_to_exclude), recipe_changes=changes,
            diagnosis=self.diagnosis, speed=speed, repaired_model=s.repaired_path if keep_repaired else None,
            quantize=self.results[chosen], seconds=time.perf_counter() - t0, warnings=self.warnings, timings=dict(self.timings),
        )
        res.report_json = s.report_dir / "recovery.json"
        res.report_md = s.report_dir / "recovery.md"
        res.quantize = dataclasses.replace(self.results[chosen], output=out, recovery=res.manifest_section())
        atomic_write_json(res.report_json, res.to_dict())
        atomic_write_text(res.report_md, markdown(res))
        return res


_NEEDS_PAIRS = "accuracy recovery needs verification pairs to score its candidates: give a .bin as --calib, not an image folder"


def check_recovery(job: Int8Job) -> float:
    """The target drop in points; a UserError for recovery settings or evaluation data that cannot work.

    Cheap (nothing is read), so that a caller can check before it quantizes. The job's
    :attr:`~pipeline.stages.quantize.job.Int8Job.pairs` score the candidates (a folder of images cannot).
    """
    from pipeline.recipe import GateSection

    rec = job.quantization.recovery
    gate = job.recipe.gate if job.recipe is not None else GateSection()
    target = rec.max_accuracy_drop if rec.max_accuracy_drop is not None else gate.max_accuracy_drop
    if target < 0:
        raise UserError(f"quantization.recovery.max_accuracy_drop must be >= 0, got {target}")
    if rec.max_fp32_nodes < 0:
        raise UserError(f"quantization.recovery.max_fp32_nodes must be >= 0, got {rec.max_fp32_nodes}")
    if rec.sensitivity_samples <= 0:
        raise UserError(f"quantization.recovery.sensitivity_samples must be positive, got {rec.sensitivity_samples}")
    if job.pairs.is_dir():
        raise UserError(_NEEDS_PAIRS)
    return target


def recover(
    job: Int8Job,
    *,
    first: "QuantizeResult | None" = None,
    report_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> RecoverResult:
    """Quantize ``job.model`` so that int8 stays within the recovery target of fp32, repairing and falling back as needed.

    ``job.quantization.recovery`` sets the target (``max_accuracy_drop``, default the recipe's
    ``gate.max_accuracy_drop``), ``eval_pairs``, ``max_fp32_nodes``, ``sensitivity_samples`` and
    ``repair``; every repair must pass the recipe's ``convert.min_cosine``; candidates are scored on
    ``job.pairs`` with the recipe's verification protocol. The chosen candidate is written at
    ``job.out``, and no manifest: the result's ``quantize`` (the chosen candidate's quantize
    result, with its ``recovery`` section) says what it is.

    Args:
        job: what to quantize and how (:class:`~pipeline.stages.quantize.job.Int8Job`).
        first: the recipe's int8 model as the quantize stage returned it (scored, not quantized again).
        report_dir: where recovery.json/.md and diagnose.json/.md go; default beside ``job.out``.
        cache_dir: fp32 embedding cache shared with ``qpipe verify`` (same key), or None.
        progress: progress bars and notes.

    The best candidate is written even when none reaches the target; ``within_target`` says which.
    """
    from pipeline.core.environment import physical_cores
    from pipeline.data.bins import VerificationBin, open_images
    from pipeline.recipe import ConvertSection, VerifySection
    from pipeline.runtime.graph import find_input, find_output, load_model

    progress = progress or NULL_PROGRESS
    t0 = time.perf_counter()
    model = require_file(job.model, "fp32 model")
    out, recipe, input_spec = job.out, job.recipe, job.input_spec
    rec = job.quantization.recovery
    vs = recipe.verify if recipe is not None else VerifySection()
    target = check_recovery(job)
    ev_source = open_images(job.pairs)
    if not isinstance(ev_source, VerificationBin):
        raise UserError(_NEEDS_PAIRS)
    if first is not None and not Path(first.output).is_file():
        raise UserError(f"recovery was handed the recipe's int8 model at {first.output}, but there is no such file")
    source = load_model(model, "fp32 model")
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = _Setup(
        job=job, source=source, q0=candidate_settings(job.quantization), input_name=find_input(source, input_spec.name).name,
        output_name=find_output(source, input_spec.output).name, target=target,
        min_cosine=(recipe.convert if recipe is not None else ConvertSection()).min_cosine, threads=vs.threads or physical_cores(),
        verify=vs, work=Path(tempfile.mkdtemp(prefix=".qpipe-recover-", dir=out.parent)),
        report_dir=Path(report_dir) if report_dir is not None else out.parent,
        repaired_path=out.with_name(f"{out.stem}.repaired-fp32.onnx"), progress=progress,
    )
    result: RecoverResult | None = None
    try:
        pairs = subset_pairs(ev_source.num_pairs, rec.eval_pairs, vs.folds)
        confirm = (vs.pairs or ev_source.num_pairs) if rec.confirm else None
        t_fp32 = time.perf_counter()
        evaluator = Evaluator(
            model, ev_source, input_spec, pairs=pairs, confirm_pairs=confirm, folds=vs.folds, flip=vs.flip, batch=vs.batch,
            threads=setup.threads, cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress,
        )
        r = _Recovery(setup, evaluator)
        r.timings["fp32_embeddings"] = time.perf_counter() - t_fp32
        if first is not None:
            # A copy: the chosen candidate is written to ``out``, which may be where the recipe's int8 is.
            kept = setup.work / "baseline" / "int8.onnx"
            kept.parent.mkdir()
            shutil.copyfile(first.output, kept)
            r.candidate("recipe's int8", model, setup.q0, [], existing=dataclasses.replace(first, output=kept))
        else:
            r.candidate("recipe's int8", model, setup.q0, [])
        if not r.attempts[0].within_target:
            an, findings = r.diagnose()
            start, start_an = r.repair(an, findings) if rec.repair else (0, an)
            if not any(a.within_target for a in r.attempts) and rec.max_fp32_nodes > 0:
                r.fallback(start, start_an)
        result = r.finish(t0)
        return result
    finally:
        shutil.rmtree(setup.work, ignore_errors=True)
        if (result is None or result.repaired_model is None) and setup.repaired_path.exists():
            setup.repaired_path.unlink()


def _speed(s: _Setup, baseline: Path, final: Path, pairs_bin: Any, *, same_kernels: bool) -> dict[str, Any]:
    """Interleaved batch-1 latency: the job's fp32 model vs the final int8, and vs the recipe's int8 when nodes went back to fp32.

    With no node in fp32 the final model runs the same int8 kernels as the recipe's, so its speed is
    the same by construction and a second measurement would only show the machine's noise.
    """
    from pipeline.data.preprocess import preprocess
    from pipeline.eval.speed import benchmark

    fp32, spec, vs, threads = s.job.model, s.job.input_spec, s.verify, s.threads
    inputs = preprocess(pairs_bin.decode_many(np.arange(min(pairs_bin.num_images, max(1, vs.throughput_batch)))), spec)
    kw = dict(
        inputs=inputs, input_name=spec.name, output_name=spec.output, threads=threads, warmup=vs.warmup,
        rounds=max(4, vs.rounds // 2), runs_per_round=vs.runs_per_round, throughput_batch=1, progress=s.progress,
    )
    fin = benchmark(fp32, final, **kw)
    out = {
        "threads": threads,
        "fp32_ms": fin.fp32.latency_ms_p50,
        "final_ms": fin.int8.latency_ms_p50,
        "final_speedup": fin.speedup,
        "baseline_ms": None,
        "baseline_speedup": None,
        "note": fin.note,
    }
    if same_kernels:
        out["cost"] = "none: no node went back to fp32 (the same int8 kernels as the recipe's int8)"
    else:
        base = benchmark(fp32, baseline, **kw)
        out["baseline_ms"] = base.int8.latency_ms_p50
        out["baseline_speedup"] = base.speedup
        out["cost"] = (f"speedup after recovery / speedup of the recipe's int8 = {fin.speedup / base.speedup:.2f}") if base.speedup else None
    return out
