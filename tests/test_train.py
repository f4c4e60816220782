"""train.py: the curriculum end to end, resume after SIGKILL, 2-rank DDP, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import data
import reorder
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--subset", "128", "--val-subset", "64", "--batch-size", "16",
        "--img-size", "16", "--patch", "4", "--depth", "1", "--dim", "32", "--heads", "2",
        "--quiet"]


def run(tmp_path, *args, name="run"):
    return train.main([*TINY, "--out", str(tmp_path / name), *args])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- the curriculum ------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity,orders,baseline", [("batch", "1", "ema"),
                                                        ("image", "1", "loo"),
                                                        ("batch", "4", "loo"),
                                                        ("image", "3", "loo")])
def test_learn_order_passes_through_all_three_phases(tmp_path, granularity, orders, baseline):
    summary = run(tmp_path, "--epochs", "4", "--learn-order", "--order", "hilbert",
                  "--policy-lr", "5", "--granularity", granularity, "--orders-per-step", orders,
                  "--baseline", baseline)
    out, lines = summary["out"], metrics(summary["out"])
    assert [m["phase"] for m in lines] == ["fixed", "learn", "finetune", "finetune"]
    assert lines[0]["tau"] == 0 and lines[2]["tau"] == 0 and 0.3 < lines[1]["tau"] / 0.2 < 0.7
    # the reward is -cross-entropy of the trained order: the learning epoch's mean is -train loss
    assert lines[0]["reward"] is None
    assert lines[1]["reward"] == pytest.approx(-lines[1]["train_loss"], rel=1e-5)
    # several orders on the same images differ in their rewards; one order has no spread
    assert (lines[1]["order_spread"] > 0) == (orders != "1") and lines[0]["order_spread"] is None
    start = reorder.PlackettLuce.from_order(reorder.order("hilbert", 4, 4)).logits.detach()
    assert lines[0]["order_shift"] == 0 and not torch.equal(summary["policy_logits"], start)
    assert lines[2]["order_shift"] == lines[3]["order_shift"]  # frozen after learning
    for m in lines:
        assert 0 <= m["val_top1"] <= m["val_top5"] <= 100 and np.isfinite(m["train_loss"])
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "order.pt", "order.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = torch.load(os.path.join(out, "order.pt"), weights_only=True)
    assert torch.equal(saved["perm"], summary["order"]) and saved["grid"] == [4, 4]
    mode = torch.argsort(summary["policy_logits"], descending=True, stable=True)
    assert torch.equal(summary["order"], mode)
    with open(os.path.join(out, "order.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_image_batches_with_an_order_per_image_keep_the_image_axis(tmp_path):
    # a batch of one image once lost its image axis: [K] log-probs met [K, 1] rewards, which
    # broadcast to [K, K] and cancel the gradient; reinforce_loss now refuses unequal shapes
    summary = run(tmp_path, "--epochs", "3", "--learn-order", "--order", "row", "--subset", "24",
                  "--batch-size", "1", "--granularity", "image", "--orders-per-step", "2")
    assert [m["phase"] for m in metrics(summary["out"])] == ["fixed", "learn", "finetune"]


@pytest.mark.parametrize("mixer,flags,window", [("window", [], 7), ("causal", [], None),
                                                ("causal", ["--window", "3"], 3),
                                                ("mamba", [], None)])
def test_every_mixer_trains_with_its_default_window(tmp_path, mixer, flags, window):
    summary = run(tmp_path, "--epochs", "2", "--learn-order", "--mixer", mixer, *flags)
    with open(os.path.join(summary["out"], "config.json")) as f:
        vit = json.load(f)["vit"]
    assert (vit["mixer"], vit["window"]) == (mixer, window)
    assert all(np.isfinite(m["train_loss"]) for m in metrics(summary["out"]))


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    # torch.compile is the GPU path's speed-up; on CPU it runs through inductor's C++ backend
    eager = run(tmp_path, "--epochs", "3", "--learn-order", name="eager")
    compiled = run(tmp_path, "--epochs", "3", "--learn-order", "--compile", name="compiled")
    for a, b in zip(metrics(eager["out"]), metrics(compiled["out"])):
        assert a["phase"] == b["phase"] and a["val_top1"] == b["val_top1"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    assert torch.equal(eager["order"], compiled["order"])


def test_a_saved_order_is_loadable_with_order_path(tmp_path):
    first = run(tmp_path, "--epochs", "1", "--order", "spiral", name="a")
    saved = os.path.join(first["out"], "order.pt")
    second = run(tmp_path, "--epochs", "1", "--order", saved, name="b")
    assert torch.equal(second["order"], reorder.order("spiral", 4, 4))


def test_order_prior_starts_from_the_least_compressible_order(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):  # constant rows, which the orderings compress unequally
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(8):
                rows = rng.integers(0, 256, (32, 1, 3), dtype=np.uint8).repeat(32, 1)
                Image.fromarray(rows).save(tmp_path / split / c / f"{i}.png")
    summary = train.main(["--data", "folder", "--root", str(tmp_path), "--order", "prior",
                          "--prior-n", "16", "--epochs", "1", "--batch-size", "4", "--depth", "1",
                          "--dim", "32", "--heads", "2", "--workers", "0", "--quiet",
                          "--out", str(tmp_path / "run")])
    with open(os.path.join(summary["out"], "prior.json")) as f:
        scores = {name: row["score"] for name, row in json.load(f)["orders"].items()}
    assert len(set(scores.values())) == 6  # no tie
    assert torch.equal(summary["order"], reorder.order(min(scores, key=scores.get), 8, 8))


def test_learning_rate_warms_up_then_decays_to_one_percent():
    f = [train.lr_factor(s, 10, 110) for s in range(111)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and abs(f[110] - 0.01) < 1e-9


def test_default_curriculum_scales_the_papers_epochs():
    a = train.parse_args(["--epochs", "100"])
    assert (a.policy_start, a.policy_epochs, a.warmup_epochs) == (15, 30, 5)
    a = train.parse_args(["--epochs", "3"])
    assert (a.policy_start, a.policy_epochs) == (1, 1)


# ---- resume and DDP (real processes) ------------------------------------------------------------

RESUME_FLAGS = ["--data", "synthetic", "--subset", "1024", "--val-subset", "64", "--batch-size",
                "8", "--img-size", "16", "--patch", "4", "--depth", "2", "--dim", "32", "--heads",
                "2", "--epochs", "3", "--learn-order", "--policy-lr", "0.05", "--save-every", "4",
                "--seed", "3", "--quiet"]


def train_cmd(out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *RESUME_FLAGS, "--out", str(out),
            *extra]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    whole = subprocess.run(train_cmd(tmp_path / "whole"), capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # kill after a mid-epoch checkpoint
        if (killed / "last.pt").exists():
            ckpt = torch.load(killed / "last.pt", weights_only=True)
            if ckpt["progress"]["epoch"] >= 1 and ckpt["progress"]["done_in_epoch"] >= 8:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(train_cmd(killed, "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    a, b = metrics(tmp_path / "whole"), metrics(killed)
    for line in a + b:
        line.pop("seconds")
    assert a == b
    for name in ("order.pt", "last.pt"):
        x, y = (torch.load(d / name, weights_only=True) for d in (tmp_path / "whole", killed))
        if name == "order.pt":
            assert torch.equal(x["perm"], y["perm"])
        else:
            assert torch.equal(x["policy"]["logits"], y["policy"]["logits"])
            assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["image", "batch"])
def test_two_ddp_ranks_agree_on_the_policy_and_on_the_logged_train_metrics(tmp_path, granularity):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train\n"
        "summary = train.main(sys.argv[1:])\n"
        "rank = os.environ['RANK']\n"
        "torch.save({'logits': summary['policy_logits'], 'history': summary['history']},\n"
        "           os.path.join(summary['out'], f'rank{rank}.pt'))\n")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *TINY, "--epochs", "3", "--learn-order", "--policy-lr", "5",
           "--granularity", granularity, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    logits = [r["logits"] for r in ranks]
    start = reorder.PlackettLuce.from_order(reorder.order("row", 4, 4)).logits.detach()
    assert torch.equal(logits[0], logits[1])
    # over both ranks' images, not rank 0's alone; one order for the batch: the K rewards too
    for name in ("train_loss", "train_top1") + (("reward", "order_spread") if granularity == "batch"
                                                else ()):
        assert [h[name] for h in ranks[0]["history"]] == [h[name] for h in ranks[1]["history"]]
    assert not torch.allclose(logits[0], start)  # the all-reduced policy gradients did move it
    assert [m["phase"] for m in metrics(out)] == ["fixed", "learn", "finetune"]


@pytest.mark.slow
@pytest.mark.parametrize("limit,file,left", [(100, "config.json", None),
                                             (20000, "last.pt", ["config.json"])])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, limit, file, left):
    import resource

    def disk_full_at_limit():  # writes beyond `limit` bytes fail as on a full disk (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out = tmp_path / "run"
    done = subprocess.run(train_cmd(out), capture_output=True, text=True, timeout=300,
                          preexec_fn=disk_full_at_limit)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot write {out / file} (OSError: [Errno 27] File too large)" in done.stderr
    assert (sorted(os.listdir(out)) if out.exists() else None) == left  # no empty folder


@pytest.mark.slow
def test_a_busy_run_folder_is_refused_with_its_pid_and_a_killed_runs_lock_is_not(tmp_path, capsys):
    script = tmp_path / "slow_run.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train\n"
        "step = train.model_step\n"
        "train.model_step = lambda *a: (time.sleep(0.3), step(*a))[1]  # a run that takes a while\n"
        "train.main(sys.argv[1:])\n")
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--save-every", "2", "--out", str(out)]
    first = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for extra in (["--resume"], ["--seed", "1"]):  # a second run, with or without --resume
        fails(capsys, [*argv, *extra], f"in use by process {first.pid}")
    assert first.poll() is None, "the first run ended before the second one was tried"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert any("lock" in name for name in os.listdir(out))  # the killed run's, left behind
    train.main([*argv, "--resume"])
    assert len(metrics(out)) == 2 and not any("lock" in name for name in os.listdir(out))


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(tmp_path):
    out = run(tmp_path, "--epochs", "1")["out"]
    for name in ("last.pt.tmp4242", "metrics.jsonl.tmp17"):
        open(os.path.join(out, name), "wb").close()
    run(tmp_path, "--epochs", "1", "--resume")
    assert not [name for name in os.listdir(out) if ".tmp" in name]


# ---- bad input: one line, exit status 2, nothing overwritten -------------------------------------

def fails(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err, err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--order", "zigzag"], "unknown order 'zigzag'"),
    (["--img-size", "30"], "image size 30x30 is not divisible by patch size 4"),
    (["--window", "-2"], "window must be >= 0"),
    (["--window", "wide"], "expected an integer or none"),
    (["--mixer", "mamba", "--window", "3"], "--window does not apply to --mixer mamba"),
    (["--mixer", "rnn"], "argument --mixer: invalid choice: 'rnn'"),
    (["--fixed-tau", "100"], "--fixed-tau samples orders from the policy: it needs --learn-order"),
    (["--learn-order", "--orders-per-step", "1", "--baseline", "loo"],
     "--baseline loo with --orders-per-step 1 needs --granularity image"),
    (["--learn-order", "--baseline", "ema"],
     "--baseline ema is the estimator of --orders-per-step 1"),
    (["--learn-order", "--orders-per-step", "0"], "--orders-per-step must be at least 1"),
    (["--epochs", "4", "--learn-order", "--policy-start", "3", "--policy-epochs", "3"],
     "exceeds --epochs 4"),
    (["--resume"], "nothing to resume"),
    (["--batch-size", "1000"], "fewer than one batch"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a CUDA device")),
    (["--clip", "-1"], "--clip must be > 0, got -1.0"),  # clip_grad_norm_ would flip the gradient
    (["--clip", "0"], "--clip must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--policy-lr", "-1", "--learn-order"], "--policy-lr must be at least 0"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--subset", "-5"], "--subset must be at least 1"),
    (["--subset", "0"], "--subset must be at least 1"),  # was silently "all"
    (["--val-subset", "0"], "--val-subset must be at least 1"),
    (["--dim", "0"], "--dim must be at least 1"),
    (["--heads", "0"], "--heads must be at least 1"),
    (["--depth", "-1"], "--depth must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--learn-order", "--policy-start", "-1"], "--policy-start must be at least 0"),
    (["--learn-order", "--tau-max", "0"], "--tau-max must be > 0"),
    (["--learn-order", "--tau-max", "-0.2"], "--tau-max must be > 0"),
    (["--learn-order", "--granularity", "image", "--orders-per-step", "1", "--baseline", "loo",
      "--batch-size", "1"], "--baseline loo needs --batch-size 2 or more"),
    (["--learn-order", "--fixed-tau", "-1"], "--fixed-tau must be at least 0"),
])
def test_bad_flags(tmp_path, capsys, extra, message):
    fails(capsys, [*TINY, "--epochs", "1", "--out", str(tmp_path / "run"), *extra], message)
    assert not (tmp_path / "run").exists()


def test_an_unwritable_out_is_one_line_before_any_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        fails(capsys, [*TINY, "--data", "folder", "--root", str(tmp_path / "nowhere"),
                       "--out", str(out)], "cannot write into")
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "not a folder"


def test_missing_and_empty_data_folders(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    fails(capsys, ["--data", "folder", "--root", str(tmp_path / "nowhere"), *out], "data folder")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    fails(capsys, ["--data", "folder", "--root", str(tmp_path / "empty"), *out], "no images in")
    fails(capsys, ["--data", "cifar10", "--root", str(tmp_path / "nocifar"), *out],
          "--data fashion-mnist")
    assert not (tmp_path / "r").exists()


def test_corrupt_mismatched_and_existing_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00garbage")
    fails(capsys, [*TINY, "--out", str(out), "--resume"], "is unreadable or corrupt")
    assert (out / "last.pt").read_bytes() == b"\x00garbage"

    run(tmp_path, "--epochs", "1", name="good")
    before = (tmp_path / "good" / "last.pt").read_bytes()
    fails(capsys, [*TINY, "--out", str(tmp_path / "good"), "--epochs", "1", "--window", "3",
                   "--resume"],
          "does not match this run: it was trained with --window 7 (now 3)")
    fails(capsys, [*TINY, "--out", str(tmp_path / "good"), "--epochs", "1"], "already holds a run")
    assert (tmp_path / "good" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("edit", ["no scheduler", "no start_perm", "pos_embed's shape"])
def test_a_hand_edited_checkpoint_is_one_line(tmp_path, capsys, edit):
    out = run(tmp_path, "--epochs", "2", "--save-every", "2")["out"]
    last = os.path.join(out, "last.pt")
    ckpt = torch.load(last, weights_only=True)
    if edit.startswith("no "):
        del ckpt[edit[3:]]
    else:
        ckpt["model"]["pos_embed"] = torch.zeros(1, 3, 32)
    torch.save(ckpt, last)
    before = open(last, "rb").read()
    fails(capsys, [*TINY, "--epochs", "2", "--save-every", "2", "--out", out, "--resume"],
          "does not fit this run")
    assert open(last, "rb").read() == before


def test_a_corrupt_order_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "order.pt"
    torch.save({"perm": np.arange(16)}, path)  # weights_only refuses numpy, in many lines
    fails(capsys, [*TINY, "--order", str(path), "--out", str(tmp_path / "run")],
          f"order file {path} is not an order of 16 patches")
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_any_run_output_is_refused_and_no_advice_loses_work(tmp_path, capsys):
    out = run(tmp_path, "--epochs", "1")["out"]
    kept = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    with open(os.path.join(out, "last.pt"), "r+b") as f:  # the repro: last.pt torn, ...
        f.truncate(100)
    err = fails(capsys, [*TINY, "--epochs", "1", "--out", out, "--resume"], "unreadable or corrupt")
    assert "delete" not in err and "another --out" in err
    os.remove(os.path.join(out, "last.pt"))  # ... then removed by hand, then a new run there
    err = fails(capsys, [*TINY, "--epochs", "1", "--seed", "1", "--out", out],
                "already holds a run")
    assert "delete" not in err
    for name, content in kept.items():
        if name != "last.pt":
            assert open(os.path.join(out, name), "rb").read() == content, name


def test_nan_at_the_first_steps_says_that_there_is_nothing_to_resume(tmp_path, capsys):
    err = fails(capsys, [*TINY, "--out", str(tmp_path / "run"), "--epochs", "1", "--lr", "1e30",
                         "--save-every", "1"], "loss is nan at step 1 (epoch 0): stopped")
    assert "--resume" not in err and "another --out" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nan_stop_keeps_the_last_state_that_gave_a_finite_loss(tmp_path, capsys, monkeypatch):
    real, steps = train.model_step, []

    def ruinous(model, *args):  # the 5th step's update leaves weights that no forward survives
        result = real(model, *args)
        steps.append(1)
        if len(steps) == 5:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e30)
        return result
    monkeypatch.setattr(train, "model_step", ruinous)
    argv = [*TINY, "--out", str(tmp_path / "run"), "--epochs", "1", "--save-every", "1"]
    err = fails(capsys, argv, "loss is nan at step 5 (epoch 0): stopped")
    assert "last.pt holds epoch 0 after 4 of 8 steps" in err and "--resume" in err
    monkeypatch.undo()
    train.main([*argv, "--resume"])  # from the state before the ruinous update: no NaN
    assert len(metrics(tmp_path / "run")) == 1


class Killed(BaseException):
    """SIGKILL at a chosen write, in-process."""


def kill_at_write(monkeypatch, out, name, epochs_done):
    """Make the write of `name` that follows the end-of-epoch last.pt of `epochs_done` epochs die
    as a kill there would."""
    real, last = data.atomic_path, os.path.join(out, "last.pt")

    @contextmanager
    def dying(path):
        if path.endswith(name) and os.path.exists(last):
            done = torch.load(last, weights_only=True)["progress"]
            if (done["epoch"], done["done_in_epoch"]) == (epochs_done, 0):
                raise Killed
        with real(path) as tmp:
            yield tmp
    monkeypatch.setattr(data, "atomic_path", dying)


def without_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.mark.parametrize("name", ["best.pt", "metrics.jsonl"])
def test_a_kill_after_the_final_checkpoint_is_repaired_by_resume(tmp_path, monkeypatch, capsys,
                                                                 name):
    argv = ["--epochs", "3", "--lr", "3e-3", "--learn-order", "--policy-lr", "0.05"]
    whole = run(tmp_path, *argv, name="whole")["out"]
    tops = [line["val_top1"] for line in metrics(whole)]
    assert tops[-1] > max(tops[:-1]), "the last epoch must be the best, for best.pt to change"
    out = str(tmp_path / "killed")
    kill_at_write(monkeypatch, out, name, epochs_done=3)
    with pytest.raises(Killed):
        run(tmp_path, *argv, name="killed")
    monkeypatch.undo()
    capsys.readouterr()
    run(tmp_path, *argv, "--resume", name="killed")
    assert "the run is complete" in capsys.readouterr().out
    assert without_seconds(metrics(out)) == without_seconds(metrics(whole))
    a, b = (torch.load(os.path.join(d, "best.pt"), weights_only=True) for d in (whole, out))
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_refuses_or_applies_and_records_changed_flags(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = [*TINY, "--epochs", "2", "--learn-order", "--policy-lr", "0.05", "--out", out]
    kill_at_write(monkeypatch, out, "metrics.jsonl", epochs_done=1)
    with pytest.raises(Killed):
        train.main(argv)
    monkeypatch.undo()
    fails(capsys, [*argv, "--resume", "--val-subset", "32"], "--val-subset 64 (now 32)")
    train.main([*argv, "--resume", "--policy-lr", "0.01", "--weight-decay", "0.1"])
    assert "--policy-lr 0.01 (was 0.05)" in capsys.readouterr().out
    changed = [line["changed"] for line in metrics(out)]
    assert changed == [{}, {"policy_lr": [0.05, 0.01], "weight_decay": [0.03, 0.1]}]
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["policy_opt"]["param_groups"][0]["lr"] == 0.01
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


@pytest.mark.slow
def test_ctrl_c_says_in_one_line_where_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # interrupt after some checkpoints
        if (out / "last.pt").exists():
            if torch.load(out / "last.pt", weights_only=True)["progress"]["done_in_epoch"] >= 8:
                proc.send_signal(signal.SIGINT)
                break
        time.sleep(0.05)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and err.count("\n") == 1, err
    done = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert (f"train.py: interrupted: --resume continues from epoch {done['epoch']} after "
            f"{done['done_in_epoch']} of 128 steps") in err


# ---- the picture of the orders -------------------------------------------------------------------

def test_draw_orders_writes_every_order_and_a_saved_one_in_one_png(tmp_path):
    from PIL import Image
    saved = tmp_path / "order.pt"
    data.save_order(str(saved), reorder.order("spiral", 4, 4).flip(0), (4, 4))
    path = tmp_path / "orders.png"
    train.main(["--draw-orders", str(path), "--img-size", "16", "--patch", "4",
                "--order", str(saved)])
    sheet = Image.open(path).convert("RGB")
    cell, columns = 224 // 4, 4
    panel = 4 * cell
    assert sheet.size == (columns * (panel + 12) + 12, 2 * (panel + 30) + 12)  # 8 panels, 2 rows
    for k, perm in enumerate([reorder.order(name, 4, 4) for name in reorder.ORDERS]
                             + [reorder.order("random", 4, 4), perm_of(saved)]):
        x0, y0 = 12 + (k % columns) * (panel + 12), 12 + (k // columns) * (panel + 30) + 16
        for slot, colour in ((0, (68, 1, 84)), (15, (253, 231, 37))):  # viridis' two ends
            r, c = divmod(int(perm[slot]), 4)
            assert sheet.getpixel((x0 + c * cell + 2, y0 + r * cell + 2)) == colour, (k, slot)


def perm_of(path):
    return torch.load(path, weights_only=True)["perm"]
