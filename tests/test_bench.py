"""Interleaved timing: structure, order, ratio from rounds, thread option. Never wall-clock assertions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.eval import speed as bench
from pipeline.runtime.session import OnnxModel
from pipeline.core import environment as envinfo
from pipeline.core.errors import UserError
from tests.synthdata import face_model


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """Advances the fake clock by a scheduled duration (ms) per call; logs every call."""

    def __init__(self, name, clock, log, duration_ms, *, dynamic_batch=True, threads=None):
        self.name, self.clock, self.log, self.duration_ms = name, clock, log, duration_ms
        self.dynamic_batch = dynamic_batch
        self.fixed_batch = None if dynamic_batch else 1
        self.threads = threads
        self.calls = 0

    def __call__(self, x):
        self.log.append((self.name, len(x)))
        self.clock.now += self.duration_ms(self.calls, len(x)) / 1000.0
        self.calls += 1
        return np.zeros((len(x), 4), np.float32)


def _factory(clock, log, durations, created=None, dynamic=True):
    def make(path, *, threads, input_name=None, output_name=None):
        name = "fp32" if "fp32" in str(path) else "int8"
        m = FakeModel(name, clock, log, durations[name], dynamic_batch=dynamic, threads=threads)
        if created is not None:
            created.append(m)
        return m

    return make


def test_rounds_interleave_and_alternate_which_model_goes_first():
    clock, log = FakeClock(), []
    res = bench.benchmark(
        "fp32.onnx", "int8.onnx", threads=2, warmup=2, rounds=4, runs_per_round=3, throughput_batch=1,
        model_factory=_factory(clock, log, {"fp32": lambda i, b: 2.0, "int8": lambda i, b: 1.0}), clock=clock,
    )
    timed = [name for name, _ in log[4:]]  # after 2 warm-up rounds of both models
    assert timed == ["fp32"] * 3 + ["int8"] * 3 + ["int8"] * 3 + ["fp32"] * 3 + ["fp32"] * 3 + ["int8"] * 3 + ["int8"] * 3 + ["fp32"] * 3
    assert [n for n, _ in log[:4]] == ["fp32", "int8", "int8", "fp32"]
    assert res.first_in_round == ["fp32", "int8", "fp32", "int8"]
    assert len(res.fp32.rounds_ms) == len(res.int8.rounds_ms) == len(res.ratios) == 4
    assert len(res.fp32.samples_ms) == 12
    assert res.speedup == pytest.approx(2.0) and res.speedup_iqr == pytest.approx((2.0, 2.0))
    assert res.fp32.latency_ms_p50 == pytest.approx(2.0) and res.int8.latency_ms_mean == pytest.approx(1.0)
    assert all(b == 1 for _, b in log)  # latency is at batch 1
    assert res.batch == 1 and res.threads == 2


def test_speedup_is_the_median_of_per_round_ratios_not_a_ratio_of_pooled_figures():
    clock, log = FakeClock(), []
    fp = [2.0, 4.0, 30.0]
    i8 = [1.0, 1.0, 20.0]
    res = bench.benchmark(
        "fp32.onnx", "int8.onnx", threads=1, warmup=0, rounds=3, runs_per_round=1, throughput_batch=1,
        model_factory=_factory(clock, log, {"fp32": lambda i, b: fp[i], "int8": lambda i, b: i8[i]}), clock=clock,
    )
    assert res.ratios == pytest.approx([2.0, 4.0, 1.5])
    assert res.speedup == pytest.approx(2.0)  # pooled medians would give 4.0, pooled means 1.64
    assert res.speedup_iqr == pytest.approx((1.75, 3.0))
    assert res.fp32.rounds_ms == pytest.approx(fp) and res.int8.rounds_ms == pytest.approx(i8)


def test_round_figure_is_the_median_of_its_runs():
    clock, log = FakeClock(), []
    fp = [1.0, 9.0, 2.0, 3.0, 3.0, 3.0]  # rounds of 3 runs: medians 2 and 3
    res = bench.benchmark(
        "fp32.onnx", "int8.onnx", threads=1, warmup=0, rounds=2, runs_per_round=3, throughput_batch=1,
        model_factory=_factory(clock, log, {"fp32": lambda i, b: fp[i], "int8": lambda i, b: 1.0}), clock=clock,
    )
    assert res.fp32.rounds_ms == pytest.approx([2.0, 3.0])
    assert res.fp32.latency_ms_p90 == pytest.approx(np.percentile(fp, 90))


def test_throughput_only_for_dynamic_batch_and_at_the_recipe_batch():
    clock, log = FakeClock(), []
    res = bench.benchmark(
        "fp32.onnx", "int8.onnx", threads=1, warmup=0, rounds=8, runs_per_round=1, throughput_batch=8,
        model_factory=_factory(clock, log, {"fp32": lambda i, b: 1.0 * b, "int8": lambda i, b: 0.5 * b}), clock=clock,
    )
    assert {b for _, b in log} == {1, 8}
    assert res.fp32.throughput_batch == 8
    assert res.fp32.throughput_ips == pytest.approx(1000.0) and res.int8.throughput_ips == pytest.approx(2000.0)
    assert res.throughput_ratio == pytest.approx(2.0)

    clock, log = FakeClock(), []
    res = bench.benchmark(
        "fp32.onnx", "int8.onnx", threads=1, warmup=0, rounds=2, runs_per_round=1, throughput_batch=8,
        model_factory=_factory(clock, log, {"fp32": lambda i, b: 1.0, "int8": lambda i, b: 1.0}, dynamic=False), clock=clock,
    )
    assert {b for _, b in log} == {1}
    assert res.fp32.throughput_ips is None and res.throughput_ratio is None


def test_default_thread_count_is_all_physical_cores(monkeypatch):
    monkeypatch.setattr(envinfo, "physical_cores", lambda: 3)
    clock, log, created = FakeClock(), [], []
    res = bench.benchmark(
        "fp32.onnx", "int8.onnx", warmup=0, rounds=1, runs_per_round=1, throughput_batch=1,
        model_factory=_factory(clock, log, {"fp32": lambda i, b: 1.0, "int8": lambda i, b: 1.0}, created), clock=clock,
    )
    assert res.threads == 3 and [m.threads for m in created] == [3, 3]


def test_missing_vnni_is_stated_beside_the_speedup(monkeypatch):
    # VNNI and AMX come from the environment's ISA class (one home), not from the raw flag table.
    base = envinfo.cpu_info()
    monkeypatch.setattr(envinfo, "cpu_info", lambda: {**base, "model": "Test CPU", "flags": {"avx512_vnni": True, "amx_int8": True}})
    for cls, expect_note, vnni, amx in (("avx2", True, False, False), ("avx512_vnni", False, True, False), ("avx_vnni", False, True, False), ("amx", False, True, True), ("none", True, False, False)):
        monkeypatch.setenv(envinfo.CPU_CLASS_ENV, cls)
        clock, log = FakeClock(), []
        res = bench.benchmark(
            "fp32.onnx", "int8.onnx", threads=1, warmup=0, rounds=1, runs_per_round=1, throughput_batch=1,
            model_factory=_factory(clock, log, {"fp32": lambda i, b: 1.0, "int8": lambda i, b: 1.0}), clock=clock,
        )
        assert res.cpu_model == "Test CPU" and res.isa_class == cls
        assert (res.note is not None and "VNNI" in res.note) == expect_note
        assert "Test CPU" in res.cpu_line() and cls in res.cpu_line()
        d = res.to_dict()
        assert d["vnni"] == vnni and d["amx"] == amx and d["isa_class"] == cls
        assert "samples_ms" not in d["fp32"] and "samples_ms" in res.to_dict(samples=True)["fp32"]


def test_real_sessions_use_the_requested_thread_count(tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    face_model(fp32, seed=0)
    m = OnnxModel(fp32, threads=1)
    opts = m.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    # idle sessions must not spin on the cores the timed session needs
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert m.dynamic_batch and m.input_name == "data" and m.output_name == "fc1"
    res = bench.benchmark(fp32, fp32, input_shape=(3, 32, 32), threads=1, warmup=1, rounds=2, runs_per_round=2, throughput_batch=4)
    assert res.threads == 1 and res.onnxruntime_version
    assert res.speedup > 0 and res.fp32.throughput_ips is not None


def test_static_batch_model_gets_no_throughput_figure(tmp_path):
    p = tmp_path / "fp32.onnx"
    face_model(p, dynamic_batch=False)
    res = bench.benchmark(p, p, input_shape=(3, 32, 32), threads=1, warmup=0, rounds=1, runs_per_round=1, throughput_batch=4)
    assert res.fp32.throughput_ips is None and not res.fp32.dynamic_batch


def test_unloadable_model_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="bad.onnx"):
        OnnxModel(bad)
    with pytest.raises(UserError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    good = tmp_path / "good.onnx"
    face_model(good)
    with pytest.raises(UserError, match="no input 'x'"):
        OnnxModel(good, input_name="x")


# --- the one interleaved loop, for any number of models ------------------------------------


class PositionClock(FakeClock):
    """A run costs ``base[model] + penalty * its block's position in the round + jitter[run in block]`` (ms).

    The position comes from the count of timed calls alone (block k of N in a round is at k % N),
    so the fake machine knows nothing of the loop's order: it only punishes going later.
    """

    def __init__(self, base, penalty, runs_per_round, jitter, warmup_calls=0, warmup_ms=1000.0):
        super().__init__()
        self.base, self.penalty, self.runs, self.jitter = base, penalty, runs_per_round, jitter
        self.warmup_calls, self.warmup_ms = warmup_calls, warmup_ms
        self.calls = 0
        self.log: list[tuple[str, float]] = []  # (model, cost) of every timed call

    def model(self, name):
        def run(x):
            assert len(x) == 1
            k = self.calls - self.warmup_calls
            self.calls += 1
            if k < 0:
                self.now += self.warmup_ms / 1000.0
                return
            block = k // self.runs
            cost = self.base[name] + self.penalty * (block % len(self.base)) + self.jitter[k % self.runs]
            self.log.append((name, cost))
            self.now += cost / 1000.0

        return run


def test_order_bias_cancels_for_three_models_and_round_figures_are_what_the_clock_gave():
    base = {"a": 10.0, "b": 20.0, "c": 5.0}
    penalty, runs, rounds = 3.0, 3, 4
    clock = PositionClock(base, penalty, runs, jitter=[0.0, 7.0, 1.0])  # median of a block's runs: +1
    res = bench.interleaved_rounds(
        {k: clock.model(k) for k in base}, np.zeros((1, 3, 4, 4), np.float32), warmup=0, rounds=rounds, runs_per_round=runs, clock=clock,
    )
    n = len(base)
    for k in base:
        # Alternating forward/reverse: every model's mean position is (N-1)/2, so the mean per-round figure is base + penalty*(N-1)/2.
        assert np.mean(res.rounds_ms[k]) == pytest.approx(base[k] + penalty * (n - 1) / 2 + 1.0)
        assert len(res.samples_ms[k]) == rounds * runs
    blocks = [clock.log[i : i + runs] for i in range(0, len(clock.log), runs)]
    assert all(len({m for m, _ in b}) == 1 for b in blocks), "a model's runs in a round are back to back"
    order = [[b[0][0] for b in blocks[r * n : (r + 1) * n]] for r in range(rounds)]
    assert order == [["a", "b", "c"], ["c", "b", "a"]] * 2
    assert res.first_in_round == ["a", "c", "a", "c"]
    for r in range(rounds):
        for b in blocks[r * n : (r + 1) * n]:
            assert res.rounds_ms[b[0][0]][r] == pytest.approx(np.median([c for _, c in b]))
    for k in base:
        assert res.samples_ms[k] == pytest.approx([c for m, c in clock.log if m == k])


def test_warm_up_runs_are_not_in_the_samples_and_the_bar_counts_every_round():
    base = {"a": 1.0, "b": 2.0, "c": 3.0}
    warmup, rounds, runs = 3, 2, 2
    clock = PositionClock(base, 0.0, runs, jitter=[0.0, 0.0], warmup_calls=warmup * len(base), warmup_ms=1000.0)
    called = []

    def model(k):
        run = clock.model(k)
        return lambda x: (called.append(k), run(x))

    class Task:
        advanced = 0

        def advance(self, n=1):
            self.advanced += n

    task = Task()
    res = bench.interleaved_rounds(
        {k: model(k) for k in base}, np.zeros((1, 3), np.float32), warmup=warmup, rounds=rounds, runs_per_round=runs, clock=clock, task=task,
    )
    assert called[: warmup * 3] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"], "warm-up rounds alternate too, one run each"
    assert len(called) == warmup * 3 + rounds * runs * 3
    for k in base:
        assert res.samples_ms[k] == pytest.approx([base[k]] * rounds * runs), "no 1000 ms warm-up run among the samples"
        assert res.rounds_ms[k] == pytest.approx([base[k]] * rounds)
    assert task.advanced == warmup + rounds


def test_the_loop_refuses_empty_timing():
    with pytest.raises(UserError, match="rounds >= 1"):
        bench.interleaved_rounds({"a": lambda x: None}, np.zeros((1, 3)), warmup=0, rounds=0, runs_per_round=1)


def test_placement_times_its_candidates_in_the_one_loop_with_alternating_order(monkeypatch):
    from pipeline.accuracy import placement

    names = ["fp32", "as_built", "depthwise_fp32", "pointwise_only"]
    base = {"fp32": 10.0, "as_built": 8.0, "depthwise_fp32": 6.0, "pointwise_only": 7.0}
    clock = PositionClock(base, 2.0, 2, jitter=[0.0, 0.0])
    created = []

    def factory(path, *, threads, input_name=None, output_name=None):
        name = Path(path).stem
        created.append((name, threads, input_name, output_name))
        m = clock.model(name)
        m.dynamic_batch, m.fixed_batch = True, None
        return m

    calls = []
    real = placement.interleaved_rounds

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(placement, "interleaved_rounds", spy)
    per_round = placement.time_models(
        {n: Path(f"{n}.onnx") for n in names}, np.zeros((4, 3, 8, 8)), input_name="data", output_name="fc1", threads=2,
        warmup=0, rounds=4, runs_per_round=2, model_factory=factory, clock=clock,
    )
    assert len(calls) == 1 and calls[0]["rounds"] == 4 and calls[0]["runs_per_round"] == 2
    assert [c[0] for c in created] == names and all(c[1:] == (2, "data", "fc1") for c in created)
    order = [clock.log[i][0] for i in range(0, len(clock.log), 2)]
    assert order == (names + names[::-1]) * 2, "forward then reverse, not rotated"
    for n in names:
        assert np.mean(per_round[n]) == pytest.approx(base[n] + 2.0 * 3 / 2)
    assert set(per_round) == set(names)


def test_placement_refuses_a_fixed_batch_other_than_one():
    from pipeline.accuracy import placement

    class Session:
        def __init__(self, fixed_batch):
            self.dynamic_batch, self.fixed_batch = fixed_batch is None, fixed_batch

        def __call__(self, x):
            return None

    with pytest.raises(UserError, match="the as_built model has a fixed batch of 8"):
        placement.time_models(
            {"fp32": Path("a"), "as_built": Path("b")}, np.zeros((1, 3)), input_name=None, output_name=None, threads=1,
            warmup=0, rounds=1, runs_per_round=1, model_factory=lambda p, **kw: Session(8 if str(p) == "b" else None),
        )
