"""Simulated int8: the embedding error of any set of int8 nodes, and the layer-wise sensitivity.

Quantizing a node one at a time with the real engine would take a full
calibration per node (a minute or more each with INC). Instead one gated copy
of the model (:mod:`pipeline.accuracy.gated`) answers every question, and it
is cut where a single tensor flows (block boundaries), so that a measurement
starts from cached values at the cut before the node that changed and costs
the part of the network after that node.

The error is the embedding error ``1 - cosine`` against fp32, averaged over
the faces. On MobileFaceNet the simulated all-int8 embedding agrees with INC's
real int8 model to within a few thousandths of cosine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline.accuracy.engine_graph import QNode
from pipeline.accuracy.gated import GATES, build_gated_model, split_gates, switch_spans
from pipeline.accuracy.ranges import outputs_in_batches
from pipeline.core.progress import NULL_PROGRESS, Progress
from pipeline.runtime.session import OnnxModel

if TYPE_CHECKING:
    from pipeline.stages.quantize.scheme import QuantScheme


@dataclass
class NodeSensitivity:
    """Embedding error (mean 1 - cosine to fp32) attributable to one node."""

    rank: int
    node: str
    op_type: str
    error_alone: float  # only this node quantized
    error_without: float | None  # every other node quantized, this one fp32
    gain_if_fp32: float | None  # error_all - error_without

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def embedding_error(ref: np.ndarray, y: np.ndarray) -> float:
    """Mean ``1 - cosine`` between the rows of ``ref`` and ``y``; a non-finite row counts as cosine -1."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = y.reshape(len(y), -1).astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, axis=1) / (na * nb)
    cos = np.where(np.isfinite(cos), cos, -1.0)
    return float(np.mean(1.0 - cos))


# --- cutting the model ------------------------------------------------------------------


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If branches) read."""
    refs: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            made = {t.name for t in sg.initializer} | {i.name for i in sg.input}
            for n in sg.node:
                made.update(n.output)
            for n in sg.node:
                refs.update(i for i in [*n.input, *_subgraph_refs(n)] if i and i not in made)
    return refs


def _uses(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_refs(node))


def single_tensor_cuts(graph: onnx.GraphProto, free: set[str]) -> list[tuple[int, str]]:
    """(position, tensor) where ``tensor`` is the only value flowing past node ``position``.

    ``free``: names available everywhere (initializers, the gates). Cutting there
    splits the model into pieces that each take one tensor and give one.
    """
    last_use: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for t in _uses(n):
            last_use[t] = i
    outputs = {o.name for o in graph.output}
    live = {i.name for i in graph.input if i.name not in free}
    cuts = []
    for i, n in enumerate(graph.node):
        live.update(o for o in n.output if o and o not in free and (o in last_use or o in outputs))
        live = {t for t in live if t in outputs or last_use.get(t, -1) > i}
        if len(live) == 1 and i < len(graph.node) - 1:
            t = next(iter(live))
            if t not in outputs:
                cuts.append((i, t))
    return cuts


def _spread(cuts: list[tuple[int, str]], length: int, pieces: int) -> list[tuple[int, str]]:
    """At most ``pieces - 1`` cuts, spread evenly over the positions."""
    if pieces <= 1 or not cuts:
        return []
    chosen: list[tuple[int, str]] = []
    for i in range(1, pieces):
        target = length * i / pieces
        best = min(cuts, key=lambda c: abs(c[0] - target))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def _piece(
    model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], inputs: Sequence[str], output: str, shapes: dict[str, list[Any]]
) -> onnx.ModelProto:
    """A model made of ``nodes`` reading ``inputs`` (with the initializers they use) and giving ``output``.

    An input that is not one of ``model``'s is declared with its shape from ``shapes``,
    so the piece's batch dimension is the model's (fixed or not).
    """
    refs = {t for n in nodes for t in _uses(n)}
    inits = [t for t in model.graph.initializer if t.name in refs]
    declared = {i.name: i for i in model.graph.input}
    ins = [declared.get(n) or helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes.get(n)) for n in inputs]
    g = helper.make_graph(list(nodes), "piece", ins, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _cut_shapes(view: onnx.ModelProto, names: list[str], images: np.ndarray, *, input_name: str, batch: int) -> dict[str, list[Any]]:
    """The shapes of tensors ``names`` of ``view``, with its batch dimension (a number when fixed, else symbolic)."""
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(view)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    runner = OnnxModel(probe, input_name=input_name, output_name=names[0], nchw=False, what="model prepared for diagnosis")
    _, outs = next(outputs_in_batches(runner, names, images[: runner.step(batch)], batch))
    first = runner.fixed_batch if runner.fixed_batch else "N"
    return {n: [first, *v.shape[1:]] for n, v in zip(names, outs)}


# --- the simulation ----------------------------------------------------------------------


@dataclass
class _Segment:
    start: int  # first position in the gated graph
    end: int  # last position
    input: str
    output: str
    gated: OnnxModel  # this piece of the gated model
    plain_rest: OnnxModel | None  # fp32 from ``output`` to the embedding (None for the last piece)
    gates: bool  # whether the piece reads the switches


class SimulatedModel:
    """The gated model, cut into pieces, with sessions: the embedding error of any set of int8 nodes.

    The model is cut where a single tensor flows (every block boundary of a
    MobileFaceNet or ResNet). Measuring one node quantized alone then starts
    from cached fp32 values at the cut before it, runs the gated piece(s)
    holding its switches, and finishes in the plain, fully optimised fp32 model;
    measuring all but one node starts from cached all-int8 values. That saves
    most of the runs' cost against running the whole gated model each time.
    Every piece runs in batches the model accepts (a fixed batch of 1 included).
    """

    def __init__(
        self, view: onnx.ModelProto, gated: onnx.ModelProto, nodes: list[QNode], images: np.ndarray, *,
        input_name: str, output_name: str, batch: int = 32, pieces: int = 8,
    ) -> None:
        self.nodes = nodes
        self.images = images
        self.input_name = input_name
        self.output_name = output_name
        self.batch = batch
        graph = gated.graph
        gate_defs, body = split_gates(graph)
        free = {t.name for t in graph.initializer} | {GATES} | {o for n in gate_defs for o in n.output}
        n_gate_nodes = len(gate_defs)
        view_cuts = {t: p for p, t in single_tensor_cuts(view.graph, {t.name for t in view.graph.initializer})}
        cuts = [(p - n_gate_nodes, t) for p, t in single_tensor_cuts(graph, free) if t in view_cuts and p >= n_gate_nodes]
        chosen = _spread(cuts, len(body), pieces)
        # Each node's switches sit between two positions of the body.
        self.span = switch_spans(body)
        shapes = _cut_shapes(view, [t for _, t in chosen], images, input_name=input_name, batch=batch)
        view_body = list(view.graph.node)
        bounds = [(-1, input_name)] + chosen + [(len(body) - 1, output_name)]
        self.segments: list[_Segment] = []
        for (a, t_in), (b, t_out) in zip(bounds[:-1], bounds[1:]):
            part = body[a + 1 : b + 1]
            needed = {t for n in part for t in _uses(n)}
            gdefs = []
            for n in reversed(gate_defs):  # the switch conditions this piece reads, with what they read
                if any(o in needed for o in n.output):
                    gdefs.insert(0, n)
                    needed.update(n.input)
            gdefs_inputs = {i for n in gdefs for i in n.input}
            reads_gates = GATES in needed or GATES in gdefs_inputs
            ins = [t_in] + ([GATES] if reads_gates else [])
            gated_piece = self._runner(_piece(gated, gdefs + part, ins, t_out, shapes), t_in, t_out, basic=True)
            rest = None
            if t_out != output_name:
                rest = self._runner(_piece(view, view_body[view_cuts[t_out] + 1 :], [t_out], output_name, shapes), t_out, output_name)
            self.segments.append(_Segment(a + 1, b, t_in, t_out, gated_piece, rest, reads_gates))
        self._plain = self._runner(view, input_name, output_name)
        self.reference = self._plain.run(images, self.batch)
        self._fp32_cache = self._cut_values(np.zeros(len(nodes), np.float32))
        self._value_cache: dict[bytes, list[np.ndarray]] = {}

    @staticmethod
    def _runner(model: onnx.ModelProto, input_name: str, output_name: str, *, basic: bool = False) -> OnnxModel:
        # basic: keep the fake-quant chains as written (no QDQ fusion into int8 kernels).
        return OnnxModel(
            model, input_name=input_name, output_name=output_name, optimization="basic" if basic else "all", nchw=False,
            what="model prepared for diagnosis",
        )

    def _run_segment(self, seg: _Segment, x: np.ndarray, gates: np.ndarray) -> np.ndarray:
        return seg.gated.run(x, self.batch, extra={GATES: gates} if seg.gates else None)

    def _cut_values(self, gates: np.ndarray) -> list[np.ndarray]:
        """The value at every piece's input (the model input first) with ``gates``."""
        vals = [self.images]
        x = self.images
        for seg in self.segments[:-1]:
            x = self._run_segment(seg, x, gates)
            vals.append(x)
        return vals

    def run(self, gates: np.ndarray, *, start: int = 0, cache: list[np.ndarray] | None = None, plain_after: int | None = None) -> np.ndarray:
        """Embeddings with ``gates``, from piece ``start`` (its input taken from ``cache``), optionally
        switching to the plain fp32 model after piece ``plain_after``."""
        gates = np.asarray(gates, dtype=np.float32)
        x = (cache or self._fp32_cache)[start] if start else self.images
        for j in range(start, len(self.segments)):
            seg = self.segments[j]
            x = self._run_segment(seg, x, gates)
            if plain_after is not None and j >= plain_after and seg.plain_rest is not None:
                return seg.plain_rest.run(x, self.batch)
        return x

    def _piece_of(self, pos: int) -> int:
        return next(j for j, s in enumerate(self.segments) if s.start <= pos <= s.end)

    def error(self, quantized: Iterable[int]) -> float:
        gates = np.zeros(len(self.nodes), np.float32)
        gates[list(quantized)] = 1.0
        return embedding_error(self.reference, self.run(gates))

    def error_alone(self, k: int) -> float:
        """Only node ``k`` int8: from the fp32 values before it, back to plain fp32 after it."""
        lo, hi = self.span[k]
        gates = np.zeros(len(self.nodes), np.float32)
        gates[k] = 1.0
        y = self.run(gates, start=self._piece_of(lo), cache=self._fp32_cache, plain_after=self._piece_of(hi))
        return embedding_error(self.reference, y)

    def _values_for(self, gates: np.ndarray) -> list[np.ndarray]:
        key = gates.tobytes()
        if key not in self._value_cache:
            if len(self._value_cache) >= 4:
                self._value_cache.pop(next(iter(self._value_cache)))
            self._value_cache[key] = self._cut_values(gates)
        return self._value_cache[key]

    def error_of(self, gates: np.ndarray, *, base: np.ndarray | None = None) -> float:
        """Error with ``gates``; given ``base`` (gates whose piece inputs are cached), only the pieces after
        the first switch that differs are run."""
        gates = np.asarray(gates, dtype=np.float32)
        if base is None:
            return embedding_error(self.reference, self.run(gates))
        base = np.asarray(base, dtype=np.float32)
        diff = np.flatnonzero(gates != base)
        spans = [self.span[int(k)][0] for k in diff if int(k) in self.span]
        if not spans:
            return embedding_error(self.reference, self.run(base))
        start = min(self._piece_of(p) for p in spans)
        return embedding_error(self.reference, self.run(gates, start=start, cache=self._values_for(base)))

    def error_all_but(self, fp32: Iterable[int]) -> float:
        """Every node int8 except ``fp32``."""
        ones = np.ones(len(self.nodes), np.float32)
        gates = ones.copy()
        gates[list(fp32)] = 0.0
        return self.error_of(gates, base=ones)


def simulate(
    model: onnx.ModelProto,
    nodes: list[QNode],
    ranges: dict[str, tuple[float, float]],
    scheme: "QuantScheme",
    images: np.ndarray,
    *,
    input_name: str,
    output_name: str,
    batch: int = 32,
    pieces: int = 8,
) -> SimulatedModel:
    """The gated copy of ``model`` (see :func:`~pipeline.accuracy.gated.build_gated_model`), ready to answer error questions on ``images``."""
    gm = build_gated_model(model, nodes, ranges, scheme)
    return SimulatedModel(model, gm, nodes, images, input_name=input_name, output_name=output_name, batch=batch, pieces=pieces)


def sensitivity(sim: SimulatedModel, *, both: bool = True, progress: Progress | None = None) -> tuple[list[NodeSensitivity], float]:
    """Per-node errors, ranked (largest ``error_alone`` first), and the all-quantized error."""
    progress = progress or NULL_PROGRESS
    n = len(sim.nodes)
    with progress.task("layer-wise sensitivity", total=n * (2 if both else 1) + 1, unit="runs") as t:
        err_all = sim.error(range(n))
        t.advance()
        rows = []
        for qn in sim.nodes:
            alone = sim.error_alone(qn.index)
            t.advance()
            without = None
            if both:
                without = sim.error_all_but([qn.index])
                t.advance()
            rows.append(
                NodeSensitivity(0, qn.name, qn.op_type, alone, without, None if without is None else err_all - without)
            )
    rows.sort(key=lambda r: (-r.error_alone, -(r.gain_if_fp32 or 0.0), r.node))
    for i, r in enumerate(rows, 1):
        r.rank = i
    return rows, err_all
