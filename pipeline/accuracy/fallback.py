"""Greedy fp32 fallback: which nodes go back to fp32, steered by the simulation, checked for real only when promising."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from pipeline.accuracy.diagnose import Analysis
from pipeline.accuracy.recovery_report import Attempt
from pipeline.core.progress import Progress


def fallback_units(an: Analysis, pool: Sequence[int]) -> list[tuple[int, ...]]:
    """Fallback candidates: single nodes, and each node with the nodes sharing one of its int8 tensors.

    A tensor between two int8 nodes stays int8 while either of them is int8, so an
    outlier tensor is only removed by returning its producer and readers together.
    """
    producer = {qn.output: qn.index for qn in an.nodes}
    units: dict[tuple[int, ...], None] = {}
    for k in pool:
        qn = an.nodes[k]
        units[(k,)] = None
        if qn.readers:
            units[tuple(sorted({k, *qn.readers}))] = None
        for t in qn.activations:
            if t in producer:
                p = producer[t]
                units[tuple(sorted({p, k, *an.nodes[p].readers}))] = None
    return list(units)


def greedy_fallback(
    an: Analysis,
    fp32_already: Sequence[str],
    start: Attempt,
    try_nodes: Callable[[list[str], float], Attempt],
    *,
    target: float,
    limit: int,
    samples: int,
    progress: Progress,
    pool_size: int = 12,
) -> float:
    """Return nodes to fp32 greedily until an attempt meets ``target``; returns the seconds spent ranking.

    ``fp32_already``: nodes the starting attempt ``start`` keeps in fp32 (its
    simulated error is filled in). ``try_nodes(names, simulated_error)``
    quantizes with ``names`` added to them, scores the candidate and returns its
    attempt. ``limit``: most nodes returned to fp32; ``samples``: faces of the
    simulation (half of them are used).

    The simulation ranks what returning each node to fp32 would gain with every
    other node int8, then the same for units (:func:`fallback_units`): a top
    node together with the nodes sharing one of its int8 tensors. Units are
    added in order of gain per node. The starting attempt's drop (on the gate's
    pairs when it was confirmed there) fixes the scale between simulated error
    and accuracy drop, proportionally; a real check runs when the prediction
    meets the target with a margin, when the simulated error has halved since
    the last check, or when the budget of nodes or units runs out. Stops at the
    first real attempt within the target.
    """
    sim = an.simulator(max(16, samples // 2))
    n = len(an.nodes)
    base = np.ones(n, np.float32)
    base[an.index(fp32_already)] = 0.0
    err_base = sim.error_of(base)
    start.simulated_error = err_base

    def gain(unit: Sequence[int]) -> float:
        trial = base.copy()
        trial[list(unit)] = 0.0
        return err_base - sim.error_of(trial, base=base)

    t_rank = time.perf_counter()
    with progress.task("ranking fp32 fallback candidates", total=n, unit="nodes") as t:
        single = {}
        for k in range(n):
            if base[k] == 1.0:
                single[(k,)] = gain((k,))
            t.advance()
    pool = [u[0] for u, _ in sorted(single.items(), key=lambda x: -x[1])[:pool_size]]
    gains = {u: single.get(u) if len(u) == 1 else gain(u) for u in fallback_units(an, pool) if all(base[k] == 1.0 for k in u)}
    order = [u for u, g in sorted(gains.items(), key=lambda x: (-x[1] / len(x[0]), len(x[0]))) if g is not None and g > 0]
    ranking = time.perf_counter() - t_rank

    gates = base.copy()
    checked_err, checked_drop = err_base, max(start.best_drop, 1e-6)
    chosen: list[int] = []
    for i, unit in enumerate(order):
        new = [k for k in unit if gates[k] == 1.0]
        if not new or len(chosen) + len(new) > limit:
            continue
        previous = gates.copy()
        chosen += new
        gates[new] = 0.0
        err = sim.error_of(gates, base=previous)
        predicted = checked_drop * err / checked_err if checked_err > 0 else 0.0
        more = any(len(chosen) + len([k for k in u if gates[k] == 1.0]) <= limit and any(gates[k] == 1.0 for k in u) for u in order[i + 1 :])
        if predicted > 0.8 * target and err > 0.5 * checked_err and more and len(chosen) < limit:
            continue
        a = try_nodes([an.nodes[k].name for k in chosen], err)
        if a.within_target or not more or len(chosen) >= limit:
            return ranking
        checked_err, checked_drop = err, max(a.best_drop, 1e-6)
    return ranking
