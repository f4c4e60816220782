"""tests/gpu_check.py's paper-scale table, dry-run on the CPU at a tiny size (on a GPU it is the
measurement docs/results.md reports)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_paper_scale_table_has_a_row_per_mixer_with_its_batch_and_projections():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"),
                          "--paper-scale", "--device", "cpu"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["window ±7", "causal", "mamba", "bimamba"]
    for r in rows[1:]:  # batch 4 (the dry run's largest), memory n/a on the CPU
        batch, fixed, learn, val, peak, epoch_h, total_h = (c.strip() for c in r[1:])
        assert batch == "4" and peak == "n/a"
        assert all(re.fullmatch(r"\d+(\.\d+)?", v) for v in (fixed, learn, val)), r
        assert 0 < float(epoch_h) < float(total_h), r  # 100 epochs take longer than one
