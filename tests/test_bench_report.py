"""bench/report.py: the interval it prints beside a time ratio."""

import random
import statistics

import pytest
from bench_script import load_bench_script

report = load_bench_script("report")


def alternating_steps(ratio: float, spread: float, steps: int = 20, seed: int = 0) -> tuple[list, list]:
    """Step times of two networks timed in alternation: a shared machine drift, then each its own noise."""
    rng = random.Random(seed)
    drift = [1.0 + 0.3 * rng.random() for _ in range(steps)]
    other = [d * (1 + spread * rng.gauss(0, 1)) for d in drift]
    ours = [d * ratio * (1 + spread * rng.gauss(0, 1)) for d in drift]
    return ours, other


def test_interval_is_the_ratio_when_every_pair_has_it():
    ours, other = alternating_steps(1.1, spread=0.0)
    low, high = report.ratio_interval(ours, other)
    assert low == pytest.approx(1.1) and high == pytest.approx(1.1)


def test_interval_holds_the_ratio_and_widens_with_the_noise():
    narrow = report.ratio_interval(*alternating_steps(0.9, spread=0.01))
    wide = report.ratio_interval(*alternating_steps(0.9, spread=0.05))
    ours, other = alternating_steps(0.9, spread=0.05)
    measured = statistics.median(ours) / statistics.median(other)
    assert wide[0] <= measured <= wide[1]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    assert report.ratio_interval(ours, other) == wide  # seeded: one report, one text


def test_pairs_stay_together():
    """A slow minute slows both networks of a pair; resampling pairs keeps it out of the ratio."""
    other = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    ours = [0.8 * t for t in other]
    assert report.ratio_interval(ours, other) == pytest.approx((0.8, 0.8))


def test_target_rows_show_the_interval_beside_the_ratio(tmp_path):
    ours, other = alternating_steps(0.95, spread=0.02)
    entry = {
        "ours": {"step_s": ours, "step_s_median": statistics.median(ours), "mfu_vs_gemm": 0.5},
        "reference": {"step_s": other, "step_s_median": statistics.median(other)},
    }
    entry["time_ratio_ours_over_reference"] = entry["ours"]["step_s_median"] / entry["reference"]["step_s_median"]
    result = {"preset": "demo", "batch": 8, "machine": {"device": "cpu"}, "networks": {"hiend_mae": entry}}
    rows = report.target_rows([(tmp_path / "step.json", "pretrain_step", result)])
    row = next(r for r in rows if r[0].startswith("hiend_mae"))
    assert row[1] == "step.json (demo, cpu, batch 8)"  # the targets were set at batch 2: other batches say so
    assert next(r for r in rows if r[0].startswith("CPU demo"))[1] == "step.json: hiend_mae, batch 8"
    low, high = report.ratio_interval(ours, other)
    assert row[2] == f"{entry['time_ratio_ours_over_reference']:.3f} ({low:.3f}–{high:.3f})"
    assert row[3] == "met"
