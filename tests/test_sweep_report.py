"""tests/sweep.py's statistics and tables, on made-up runs whose answers are known."""
import csv
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402

ORDERS = ("row", "column", "hilbert", "spiral", "diagonal", "snake")


def test_sign_flip_test_is_exact_for_few_pairs():
    # of the 8 sign patterns of (1, 2, 3), only all-plus and all-minus reach |sum| = 6
    assert sweep.sign_flip_test([1.0, 2.0, 3.0]) == 2 / 8
    assert sweep.sign_flip_test([1.0, -1.0]) == 1.0


def test_order_effect_sees_an_effect_and_not_noise_and_ignores_seed_offsets():
    rng = random.Random(0)
    seed_offsets = [rng.gauss(0, 5) for _ in range(4)]  # what blocking by seed removes
    noise = [[off + rng.gauss(0, 0.5) for _ in ORDERS] for off in seed_offsets]
    effect = [[v + 2.0 * j for j, v in enumerate(row)] for row in noise]
    spread, sd, p = sweep.order_effect(effect)
    assert p < 0.001 and 9 < spread < 11 and 0.2 < sd < 0.8
    assert sweep.order_effect(noise)[2] > 0.05


def test_report_tables_on_known_rows(tmp_path):
    rows = []
    for seed in range(3):
        for j, name in enumerate(ORDERS):
            rows.append({"group": "fixed", "mixer": "mamba", "order": name, "seed": seed,
                         "val_top1": 60.0 + 2 * j + seed})
            rows.append({"group": "reorder", "mixer": "mamba", "order": name, "seed": seed,
                         "val_top1": 61.0 + 2 * j + seed})  # 1 point above its start, always
            rows.append({"group": "control", "mixer": "full", "order": name, "seed": seed,
                         "val_top1": 70.0 + seed})
    text = sweep.report(rows, str(tmp_path), figure=str(tmp_path / "results.png"),
                        estimators=False)
    assert "| row | 61.00 ± 1.00 (n=3) | 62.00 ± 1.00 (n=3) | 71.00 ± 1.00 (n=3) |" in text
    assert "| mamba, fixed | 3 | 10.00 | 0.00 |" in text  # seed offsets removed: no noise left
    assert "| full attention (control) | 3 | 0.00 | 0.00 | 1.000 |" in text
    # 18 pairs, all +1: of 20000 sampled sign flips, hardly any reaches it
    assert "| mamba | +1.00 | < 0.001 | 18 of 18 | 67.00 | snake (71.00) |" in text
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "results.md").read_text() == text
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("groups,count", [({"fixed"}, 54), ({"control"}, 18),
                                          ({"neighbours", "pairs"}, 21)])
def test_sweep_plans_every_order_mixer_and_seed(groups, count):
    jobs = sweep.runs(groups, "out")
    assert len(jobs) == count and len({sweep.flag(j[4], "--out") for j in jobs}) == count


def test_plateau_tables_and_curves(tmp_path):
    rows = []
    for seed in range(3):
        for j, name in enumerate(("row", "column", "spiral")):
            curve = [50.0 + 20 * (1 - 0.5 ** e) - 2 * j + seed for e in range(10)]
            rows.append({"group": "plateau-fixed", "mixer": "causal", "order": name, "seed": seed,
                         "val_top1": curve[-1], "train_top1": 80.0, "curve": curve,
                         "last20_change": curve[-1] - curve[-3], "last20_trend": 0.0,
                         "last20_range": curve[-1] - curve[-3]})
        spiral = rows[-1]
        for group, gain in (("plateau-reorder", 1.0), ("plateau-frozen", 0.5)):
            curve = [v + gain for v in spiral["curve"]]
            rows.append({**spiral, "group": group, "curve": curve, "val_top1": curve[-1]})
    text = sweep.report(rows, str(tmp_path), figure=str(tmp_path / "results.png"),
                        estimators=False)
    assert "| causal | 3 | row 70.96 > column 68.96 > spiral 66.96 | 4.00 | 0.00 |" in text
    assert "| causal | REOrder − fixed spiral | +1.00 | 0.250 | 3 of 3 | 0.00 |" in text
    assert "| causal | REOrder − frozen | +0.50 | 0.250 | 3 of 3 | 0.00 |" in text
    assert (tmp_path / "plateau.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "results.png").exists()  # no fixed/reorder/control rows: no bar chart


def test_plateau_plan_follows_the_papers_proportions():
    jobs = sweep.runs({"plateau", "plateau-reorder"}, "out", seeds=(0, 1), mixers=("causal",))
    assert [j[0] for j in jobs[:5]] == ["plateau-fixed"] * 3 + ["plateau-reorder", "plateau-frozen"]
    args = jobs[3][4]
    e = int(sweep.flag(args, "--epochs"))
    assert int(sweep.flag(args, "--policy-start")) == round(0.15 * e)
    assert int(sweep.flag(args, "--policy-epochs")) == round(0.30 * e)
    assert sweep.flag(jobs[4][4], "--policy-lr") == "0" and len(jobs) == 10
