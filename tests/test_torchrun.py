"""torchrun: two ranks on CPU (gloo) keep the promises of one process: a run stopped by a signal,
to the launcher or to one rank only, says where --resume continues, and the resumed run logs and
saves exactly what the uninterrupted one does."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 512 images / (16 x 2 ranks) = 16 steps an epoch; a checkpoint every 2 steps
FLAGS = ["--data", "synthetic", "--img-size", "16", "--patch", "4", "--dim", "32", "--depth", "2",
         "--heads", "2", "--batch-size", "16", "--subset", "512", "--val-subset", "64",
         "--epochs", "3", "--learn-order", "--save-every", "2", "--seed", "3", "--quiet"]
SCRIPT = """import os, sys, time
sys.path.insert(0, {root!r})
import train
with open(os.path.join({pids!r}, f"rank{{train.RANK}}"), "w") as f:
    f.write(str(os.getpid()))
real = train.model_step
train.model_step = lambda *a: (time.sleep({delay}), real(*a))[1]  # time to act mid-epoch
train.main(sys.argv[1:])
"""


def torchrun(tmp_path, out, *extra, delay=0.0):
    pids = tmp_path / f"pids-{out.name}"
    pids.mkdir(exist_ok=True)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=ROOT, pids=str(pids), delay=delay))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *FLAGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}), pids


def outputs(out):
    """metrics.jsonl without the wall times, and order.pt's bytes."""
    with open(out / "metrics.jsonl") as f:
        lines = [line.split(', "seconds"')[0] for line in f]
    return lines, (out / "order.pt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("target,flags", [
    ("launcher", []),  # K = 4 orders for the batch, leave-one-out
    # one order per image, the paper's EMA baseline: each rank's rewards are of its own images
    ("rank 1", ["--granularity", "image", "--orders-per-step", "1", "--baseline", "ema"])])
def test_a_sigterm_mid_epoch_is_one_line_and_the_resumed_run_logs_the_same(tmp_path, target,
                                                                           flags):
    whole, _ = torchrun(tmp_path, tmp_path / "whole", *flags)
    err = whole.communicate(timeout=600)[1]
    assert whole.returncode == 0, err[-3000:]

    out = tmp_path / "run"
    proc, pids = torchrun(tmp_path, out, *flags, delay=0.1)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # into epoch 1, after a checkpoint
        try:
            progress = torch.load(out / "last.pt", weights_only=True)["progress"]
        except Exception:  # not there yet, or being replaced
            progress = {"epoch": 0}
        if progress["epoch"] == 1 and progress["done_in_epoch"] >= 3:
            break
        time.sleep(0.05)
    pid = proc.pid if target == "launcher" else int((pids / "rank1").read_text())
    os.kill(pid, signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    done = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert done["epoch"] == 1 and 3 < done["done_in_epoch"] < 16, done  # mid-epoch, a later step
    line = (f"train.py: interrupted (SIGTERM): --resume continues from epoch 1 after "
            f"{done['done_in_epoch']} of 16 steps ({out}/last.pt)")
    ours = [text for text in err.splitlines() if text.startswith("train.py")]
    assert ours == [line], err[-3000:]  # once, by the writer rank
    assert 'train.py", line' not in err, err[-3000:]  # no traceback through our code
    if target == "rank 1":  # torchrun's report: both ranks ended as a SIGTERM'd run does
        assert len(re.findall(r"exitcode\s*:\s*143 ", err)) == 2, err[-3000:]

    resumed, _ = torchrun(tmp_path, out, *flags, "--resume")
    err = resumed.communicate(timeout=600)[1]
    assert resumed.returncode == 0, err[-3000:]
    assert outputs(out) == outputs(tmp_path / "whole")
