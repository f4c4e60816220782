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
