"""What a recovery run did: its attempts and result, the recovery report, and the manifest's ``recovery`` section."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.accuracy.repairs import Repair
from pipeline.core.files import sha256_file

if TYPE_CHECKING:
    from pipeline.stages.quantize.stage import QuantizeResult


@dataclass
class Attempt:
    """One int8 candidate and its score on the evaluation subset."""

    label: str
    nodes_fp32: list[str]
    repairs: list[str]
    settings: dict[str, Any]
    accuracy: float
    accuracy_std: float
    drop: float
    within_target: bool
    cosine_mean: float
    cosine_min: float
    simulated_error: float | None
    seconds: float
    # On the verify gate's pairs, for a candidate that met the target on the subset.
    confirm_pairs: int | None = None
    confirm_accuracy: float | None = None
    confirm_drop: float | None = None

    @property
    def best_drop(self) -> float:
        """The best-founded drop: on the gate's pairs when the attempt was confirmed there."""
        return self.confirm_drop if self.confirm_drop is not None else self.drop

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoverResult:
    """What recovery did. Accuracies in percent on the evaluation subset; drops in points.

    ``quantize``: the chosen candidate's quantize result, its output at the recovery's
    ``out`` and its ``recovery`` field set to :meth:`manifest_section`.
    """

    output: Path
    target: float
    eval_pairs: int
    total_pairs: int
    fp32_accuracy: float
    within_target: bool
    attempts: list[Attempt]
    final: Attempt
    repairs: list[Repair]
    nodes_fp32: list[str]
    recipe_changes: dict[str, Any]
    diagnosis: dict[str, Any] | None
    speed: dict[str, Any] | None
    repaired_model: Path | None
    quantize: "QuantizeResult"
    seconds: float
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    report_json: Path | None = None
    report_md: Path | None = None

    @property
    def baseline(self) -> Attempt:
        return self.attempts[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "target_max_accuracy_drop": self.target,
            "eval_pairs": self.eval_pairs,
            "total_pairs": self.total_pairs,
            "fp32_accuracy": self.fp32_accuracy,
            "within_target": self.within_target,
            "baseline": self.baseline.to_dict(),
            "final": self.final.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "repairs": [r.to_dict() for r in self.repairs],
            "nodes_fp32": list(self.nodes_fp32),
            "recipe_changes": self.recipe_changes,
            "diagnosis": self.diagnosis,
            "speed": self.speed,
            "repaired_model": str(self.repaired_model) if self.repaired_model else None,
            # The manifest is written after this report, by the caller: its path is not this report's to give.
            "quantize": {k: v for k, v in self.quantize.to_dict().items() if k not in ("recovery", "manifest")},
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "report_json": str(self.report_json) if self.report_json else None,
            "report_md": str(self.report_md) if self.report_md else None,
        }

    def summary(self) -> list[str]:
        b, f = self.baseline, self.final
        lines = [
            f"recovery on {self.eval_pairs} of {self.total_pairs} pairs: fp32 {self.fp32_accuracy:.2f}, "
            f"int8 {b.accuracy:.2f} (drop {b.drop:+.2f}) -> {f.accuracy:.2f} (drop {f.drop:+.2f}); target <= {self.target:g} points: "
            + ("met" if self.within_target else "NOT met"),
        ]
        if f.confirm_drop is not None:
            lines.append(f"on the gate's {f.confirm_pairs} pairs: int8 {f.confirm_accuracy:.2f} (drop {f.confirm_drop:+.2f})")
        for r in self.repairs:
            lines.append(f"repaired: {r.kind}: {r.detail}")
        lines.append(f"left in fp32: {', '.join(self.nodes_fp32) if self.nodes_fp32 else 'none'}")
        if self.speed:
            s = self.speed
            lines.append(
                f"speed: int8 {s['final_speedup']:.2f}x fp32 after recovery"
                + (f" (recipe's int8 {s['baseline_speedup']:.2f}x)" if s.get("baseline_speedup") is not None else "")
                + (f"; cost: {s['cost']}" if s.get("cost") else "")
            )
        if self.diagnosis:
            lines.append(f"diagnosis: suspects {', '.join(self.diagnosis.get('culprits', [])[:5])}")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines

    def manifest_section(self) -> dict[str, Any]:
        """The ``recovery`` section of the int8 model's manifest."""
        return {
            "target_max_accuracy_drop": self.target,
            "eval_pairs": self.eval_pairs,
            "fp32_accuracy": self.fp32_accuracy,
            "within_target": self.within_target,
            "attempts": [a.to_dict() for a in self.attempts],
            "final": self.final.label,
            "repairs": [x.to_dict() for x in self.repairs],
            "nodes_fp32": self.nodes_fp32,
            "recipe_changes": self.recipe_changes,
            "speed": self.speed,
            "repaired_model": {"path": str(self.repaired_model), "sha256": sha256_file(self.repaired_model)} if self.repaired_model else None,
            "culprits": (self.diagnosis or {}).get("culprits", []),
            "summary": self.summary(),
            "report": str(self.report_md) if self.report_md else None,
        }


def markdown(res: RecoverResult) -> str:
    out = [
        "# Accuracy recovery",
        "",
        f"- target: int8 within {res.target:g} points of fp32 on the evaluation subset "
        f"({res.eval_pairs} of {res.total_pairs} pairs, whole folds, insightface protocol)",
        f"- fp32 accuracy on the subset: {res.fp32_accuracy:.2f}",
        f"- result: {'within target' if res.within_target else 'target NOT reached (best attempt kept)'}: "
        f"int8 {res.final.accuracy:.2f} (drop {res.final.drop:+.2f}) on the subset"
        + (
            f", {res.final.confirm_accuracy:.2f} (drop {res.final.confirm_drop:+.2f}) on the gate's {res.final.confirm_pairs} pairs"
            if res.final.confirm_drop is not None else ""
        )
        + f"; written to `{res.output}`",
        f"- left in fp32: {', '.join(f'`{n}`' for n in res.nodes_fp32) or 'none'}",
        "",
        "## Repairs",
        "",
    ]
    out += [f"- **{r.kind}** ({', '.join(f'`{n}`' for n in r.nodes)}): {r.detail}" for r in res.repairs] or ["None."]
    out += [
        "", "## Attempts", "",
        f"Accuracy and drop on the {res.eval_pairs}-pair subset; a candidate within the target there is re-checked on the "
        "verify gate's pairs (last column) before recovery stops. Simulated error: 1 - cosine to fp32 predicted by the diagnosis.",
        "",
        "| # | attempt | fp32 nodes | accuracy | drop | cosine mean / min | simulated error | within | s | on the gate's pairs |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for i, a in enumerate(res.attempts):
        sim = "" if a.simulated_error is None else f"{a.simulated_error:.2e}"
        gate = "" if a.confirm_drop is None else f"{a.confirm_accuracy:.2f} (drop {a.confirm_drop:+.2f}, {a.confirm_pairs} pairs)"
        out.append(
            f"| {i} | {a.label} | {len(a.nodes_fp32)} | {a.accuracy:.2f} +- {a.accuracy_std:.2f} | {a.drop:+.2f} | "
            f"{a.cosine_mean:.5f} / {a.cosine_min:.4f} | {sim} | {'yes' if a.within_target else 'no'} | {a.seconds:.0f} | {gate} |"
        )
    if res.speed:
        s = res.speed
        out += ["", "## Speed", "", f"Batch-1 latency, interleaved rounds, {s.get('threads')} threads:", ""]
        out.append(f"- after recovery: fp32 {s['fp32_ms']:.2f} ms, int8 {s['final_ms']:.2f} ms: **{s['final_speedup']:.2f}x**")
        if s.get("baseline_speedup") is not None:
            out.append(f"- the recipe's int8 (no recovery): {s['baseline_ms']:.2f} ms: {s['baseline_speedup']:.2f}x")
        if s.get("cost"):
            out.append(f"- speed cost of recovery: {s['cost']}")
        if s.get("note"):
            out.append(f"- {s['note']}")
    if res.recipe_changes:
        on = f"the repaired fp32 model `{res.repaired_model}`" if res.repaired_model else "your fp32 model"
        out += ["", "## Recipe keys of the result", "", f"Quantizing {on} with these settings gives this int8 model:", "",
                "```json", json.dumps(res.recipe_changes, indent=2), "```"]
    if res.timings:
        out += ["", "## Time", "", f"{res.seconds:.0f} s in all: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in res.timings.items())]
    if res.diagnosis:
        out += ["", "## Diagnosis of the recipe's int8", ""]
        out += [f"- suspects: {', '.join(f'`{c}`' for c in res.diagnosis.get('culprits', []))}"]
        for f in res.diagnosis.get("findings", []):
            if f["severity"] != "info":
                out.append(f"- {f['severity']}: `{f['node']}` {f['kind']}: {f['message']}")
        out += ["", "| rank | node | op | error, only this int8 |", "| ---: | --- | --- | ---: |"]
        for r in res.diagnosis.get("sensitivity", [])[:15]:
            out.append(f"| {r['rank']} | `{r['node']}` | {r['op_type']} | {r['error_alone']:.2e} |")
    if res.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in res.warnings]
    return "\n".join(out) + "\n"


def summary_lines(section: dict[str, Any] | None) -> list[str]:
    """What ``qpipe quantize`` prints about recovery, from ``QuantizeResult.recovery``."""
    if not section:
        return []
    lines = list(section.get("summary") or [])
    if section.get("report"):
        lines.append(f"recovery report: {section['report']}")
    return lines
