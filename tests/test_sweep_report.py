"""tests/sweep.py's tables: the cells, spreads and differences it reports from finished runs."""
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402


def test_report_gives_mean_std_spread_and_reorder_minus_its_start(tmp_path):
    rows = []
    for seed, (row, column) in enumerate([(70.0, 60.0), (72.0, 62.0), (74.0, 64.0)]):
        rows += [{"group": "fixed", "order": "row", "seed": seed, "val_top1": row},
                 {"group": "fixed", "order": "column", "seed": seed, "val_top1": column},
                 {"group": "learn", "order": "row", "seed": seed, "val_top1": row + 1},
                 {"group": "learn", "order": "column", "seed": seed, "val_top1": column - 3},
                 {"group": "learn", "order": "prior:diagonal", "seed": seed, "val_top1": 50.0}]
    text = sweep.report(rows, str(tmp_path))
    assert "| row | 72.00 ± 2.00 (n=3) | 73.00 ± 2.00 (n=3) |" in text
    assert "| column | 62.00 ± 2.00 (n=3) | 59.00 ± 2.00 (n=3) |" in text
    assert "| prior:diagonal |  | 50.00 ± 0.00 (n=3) |" in text
    spread = "spread across orderings (max - min of means)"
    assert f"fixed: {spread} 10.00, mean seed-to-seed std 2.00" in text
    assert f"learn: {spread} 14.00" in text  # prior runs kept apart
    assert ("REOrder minus its fixed start, averaged over orderings: -1.00 (1 of 2 orderings above)"
            in text)
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "results.md").read_text() == text
