"""train.py: the curriculum end to end, resume after SIGKILL, 2-rank DDP, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import reorder
import train
from test_hostile import snapshot

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
    # depth 2, window 1: at depth 1 CLS reads every patch once, so the order could not matter
    summary = run(tmp_path, "--epochs", "4", "--learn-order", "--order", "hilbert",
                  "--policy-lr", "5", "--granularity", granularity, "--orders-per-step", orders,
                  "--baseline", baseline, "--depth", "2", "--window", "1")
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
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "order.pt", "order.png",
                 "train.lock"):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = torch.load(os.path.join(out, "order.pt"), weights_only=True)
    assert torch.equal(saved["perm"], summary["order"]) and saved["grid"] == [4, 4]
    mode = torch.argsort(summary["policy_logits"], descending=True, stable=True)
    assert torch.equal(summary["order"], mode)
    with open(os.path.join(out, "order.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_only_the_learning_phase_runs_the_model_on_several_orders(tmp_path, monkeypatch):
    # K orders cost K forward passes: before and after learning one order (here a --fixed-tau
    # sample around the start) is all the classifier needs
    shapes, model_step = [], train.model_step
    monkeypatch.setattr(train, "model_step",
                        lambda *a: shapes.append(tuple(a[5].shape)) or model_step(*a))
    run(tmp_path, "--epochs", "3", "--learn-order", "--fixed-tau", "0.3", "--orders-per-step", "3")
    assert shapes == [(1, 16)] * 8 + [(3, 16)] * 8 + [(1, 16)] * 8


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


@pytest.mark.slow
def test_compile_builds_each_kind_of_forward_once(tmp_path, monkeypatch):
    # one graph per kind: training and no-grad (scoring, validation), for an order per batch
    # [N] and per image [B, N]; none after the first epoch of a phase. bf16 autocast as on a GPU
    # (the CPU runs it too); 40 validation images in batches of 16: a short last batch
    import torch._dynamo
    torch._dynamo.reset()
    monkeypatch.setattr(train, "amp_dtype", lambda flag, device: torch.bfloat16)
    graphs, record = [], train.epoch_record
    monkeypatch.setattr(train, "epoch_record", lambda *a: (graphs.append(
        torch._dynamo.utils.counters["stats"]["unique_graphs"]), record(*a))[1])
    torch._dynamo.utils.counters.clear()
    run(tmp_path, "--epochs", "5", "--learn-order", "--granularity", "image", "--compile",
        "--val-subset", "40")  # fixed, learn, learn, finetune, finetune
    assert graphs == [2, 4, 4, 4, 4]


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


@pytest.mark.parametrize("granularity", ["batch", "image"])
def test_each_order_is_rewarded_with_the_cross_entropy_of_the_model_under_it(
        tmp_path, monkeypatch, granularity):
    # through the loop: the weights the step started from, each of the K sampled orders (random:
    # tau up to 100) scored on its own; the policy must get those rewards, each with its order
    expected, got = [], []
    real_step, real_update = train.model_step, train.policy_update

    def model_step(model, optimizer, scaler, images, labels, perms, *rest):
        with torch.no_grad():
            ce = torch.stack([torch.nn.functional.cross_entropy(model(images, p), labels,
                                                                reduction="none") for p in perms])
        expected.append(-(ce.mean(1) if granularity == "batch" else ce))  # [K] or [K, B]
        return real_step(model, optimizer, scaler, images, labels, perms, *rest)

    def policy_update(policy, policy_opt, perm, tau, reward, baseline):
        got.append(reward.clone())
        return real_update(policy, policy_opt, perm, tau, reward, baseline)
    monkeypatch.setattr(train, "model_step", model_step)
    monkeypatch.setattr(train, "policy_update", policy_update)
    run(tmp_path, "--epochs", "3", "--learn-order", "--granularity", granularity,
        "--orders-per-step", "3", "--depth", "2", "--window", "1", "--tau-max", "100",
        "--subset", "64")
    assert len(got) == 4 and len(expected) == 12  # 4 learning steps of 12
    for want, reward in zip(expected[4:8], got):
        assert torch.allclose(reward, want, rtol=1e-6, atol=0)


# ---- the policy's step and the epoch's numbers, called directly ---------------------------------

def test_phase_follows_the_curriculum_step_by_step():
    args = SimpleNamespace(learn_order=True, policy_start=1, policy_epochs=2, tau_max=0.2,
                           fixed_tau=0.5)
    stages = [train.phase(step, args, 4) for step in range(16)]
    assert [stage for stage, _ in stages] == ["fixed"] * 4 + ["learn"] * 8 + ["finetune"] * 4
    assert [tau for _, tau in stages] == [0.5] * 4 + [
        reorder.triangle_tau(k, 8, 0.2) for k in range(8)] + [0.0] * 4


def test_sample_orders_come_from_the_generator_in_the_shape_asked():
    policy = reorder.PlackettLuce.from_order(reorder.order("row", 2, 2))

    def draw(seed, images=None):
        return train.sample_orders(policy, 3, 1.0, torch.Generator().manual_seed(seed), images)
    assert draw(0).shape == (3, 4) and draw(0, 5).shape == (3, 5, 4)
    assert torch.equal(draw(0, 5), draw(0, 5)) and not torch.equal(draw(0, 5), draw(1, 5))


def log_p(s, perms, tau):
    """log p(perm) under logits s / tau, the product formula written out: [K, N] -> [K]."""
    z = s / tau
    return torch.stack([sum(z[p[k]] - torch.logsumexp(z[p[k:]], 0) for k in range(len(p)))
                        for p in perms])


def test_policy_update_steps_along_the_gradient_at_the_sampling_temperature():
    # SGD (lr 1) on -mean(A log p(perm; s / tau)), twice (the second from fresh gradients); at
    # tau = 0.5 the step is not the one at tau = 1 (the released code's scoring); a gradient
    # above norm 5 is clipped to 5
    tau, perms = 0.5, torch.tensor([[2, 0, 1], [1, 2, 0]])
    policy = reorder.PlackettLuce(3)
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    policy_opt = train.policy_optimizer(policy, 1.0)
    for scale, norm in ((1.0, None), (1.0, None), (100.0, 5.0)):
        reward = torch.tensor([1.0, -1.0]) * scale
        baseline = reorder.loo_baseline(reward)
        s = policy.logits.detach().clone().requires_grad_()
        grad = torch.autograd.grad(-((reward - baseline) * log_p(s, perms, tau)).mean(), s)[0]
        assert (grad.norm() < 5) == (norm is None)  # norm 3.1 unclipped, 311 clipped
        step = grad if norm is None else grad * norm / grad.norm()
        log_prob = train.policy_update(policy, policy_opt, perms, tau, reward, baseline)
        assert torch.allclose(log_prob, log_p(s, perms, tau).detach(), rtol=0, atol=1e-6)
        assert torch.allclose(policy.logits.detach(), s.detach() - step, rtol=0, atol=1e-5)


def reinforce_sees(monkeypatch, losses, granularity="batch", baseline="loo", reward="xent",
                   logits=None, labels=None):
    """train.reinforce on fabricated losses [K, B]: what it hands the policy, and its sums."""
    seen = {}

    def policy_update(policy, policy_opt, perm, tau, reward, baseline):
        seen.update(reward=reward, baseline=baseline)  # log p: -2, -4, ..., mean -(K B + 1)
        return -2.0 * torch.arange(1, reward.numel() + 1, dtype=torch.float64).view(reward.shape)
    monkeypatch.setattr(train, "policy_update", policy_update)
    K, B = losses.shape
    args = SimpleNamespace(reward=reward, granularity=granularity, baseline=baseline)
    state = {"policy": None, "policy_opt": None, "baseline": reorder.EMABaseline(0.75)}
    progress = {"sums": {}}
    logits = torch.zeros(K, B, 3) if logits is None else logits
    train.reinforce(args, state, torch.zeros(K, 4, dtype=torch.long), 0.1, logits, losses,
                    torch.zeros(B, dtype=torch.long) if labels is None else labels, progress)
    return seen, {k: float(v) for k, v in progress["sums"].items()}


LOSSES = torch.tensor([[0.5, 1.5], [4.0, 6.0], [3.0, 3.0]])  # K = 3 orders x B = 2 images


def test_reinforce_rewards_each_order_and_baselines_it_with_the_other_orders(monkeypatch):
    # one order per batch: rewards -1, -5, -3 (the images' mean), leave-one-out over the orders
    seen, sums = reinforce_sees(monkeypatch, LOSSES)
    assert seen["reward"].tolist() == [-1.0, -5.0, -3.0]
    assert seen["baseline"].tolist() == [-4.0, -2.0, -3.0]
    # the trained order's reward and its square, the orders' spread (std), -mean log p
    assert sums == {"reward": -1.0, "reward_sq": 1.0, "spread": 2.0, "neg_logp": 4.0,
                    "policy_steps": 1}
    # one order per image: an image's orders are compared with each other, not with other images
    seen, sums = reinforce_sees(monkeypatch, LOSSES, granularity="image")
    assert seen["reward"].tolist() == (-LOSSES).tolist()
    assert seen["baseline"].tolist() == [[-3.5, -4.5], [-1.75, -2.25], [-2.25, -3.75]]
    assert sums == {"reward": -1.0, "reward_sq": 1.0, "spread": 2.0, "neg_logp": 7.0,
                    "policy_steps": 1}


def test_reinforce_with_one_order_uses_the_ema_or_the_other_images(monkeypatch):
    seen, sums = reinforce_sees(monkeypatch, torch.tensor([[1.0, 3.0]]), baseline="ema")
    assert seen["reward"].tolist() == [-2.0] and float(seen["baseline"]) == -2.0  # first step
    assert sums == {"reward": -2.0, "reward_sq": 4.0, "spread": 0.0, "neg_logp": 2.0,
                    "policy_steps": 1}
    # binary rewards: +1 right, -1 wrong (argmax 0 1 2 0 against labels 0 2 2 1)
    logits = torch.eye(3)[torch.tensor([[0, 1, 2, 0]])]  # [1, 4, 3]
    seen, _ = reinforce_sees(monkeypatch, torch.zeros(1, 4), "image", "loo", "binary", logits,
                             torch.tensor([0, 2, 2, 1]))
    assert seen["reward"].tolist() == [[1.0, -1.0, 1.0, -1.0]]
    assert torch.allclose(seen["baseline"], torch.tensor([[-1.0, 1.0, -1.0, 1.0]]) / 3)


def test_mean_over_ranks_is_the_mean_of_every_ranks_values(monkeypatch):
    monkeypatch.setattr(train, "WORLD", 2)  # the other rank holds 3, 1
    monkeypatch.setattr(train.dist, "all_reduce", lambda t, **k: t.add_(torch.tensor([3.0, 1.0])))
    t = torch.tensor([1.0, -3.0])
    assert train.mean_over_ranks(t) is t and t.tolist() == [2.0, -1.0]


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_record_derives_its_numbers_from_the_epochs_sums(monkeypatch, world):
    # two ranks with the same sums (all_reduce doubles them) log what one rank logs
    monkeypatch.setattr(train, "WORLD", world)
    monkeypatch.setattr(train.dist, "all_reduce", lambda t, **k: t.mul_(2))
    args = SimpleNamespace(learn_order=True, policy_start=1, policy_epochs=2, tau_max=0.2,
                           fixed_tau=0.5)
    start, now = reorder.order("spiral", 3, 3), reorder.order("snake", 3, 3)

    def record(epoch, sums):
        return train.epoch_record({"epoch": epoch, "sums": sums, "changed": {}}, args, 4, 50.0,
                                  75.0, 1e-3, now, start, torch.device("cpu"), 1.0)
    # 4 learning steps: per step reward -1.5, reward² 6.25 (batch noise sqrt(6.25 - 2.25) = 2)
    line = record(1, {"loss": 12.0, "correct": 6, "images": 16, "tau": 0.75, "steps": 4,
                      "policy_steps": 4, "reward": -6.0, "reward_sq": 25.0, "neg_logp": 10.0,
                      "spread": 2.0})
    assert {k: line[k] for k in ("phase", "train_loss", "train_top1", "tau", "reward", "entropy",
                                 "order_spread", "batch_noise")} == {
        "phase": "learn", "train_loss": 0.75, "train_top1": 37.5, "tau": 0.1875, "reward": -1.5,
        "entropy": 2.5, "order_spread": 0.5, "batch_noise": 2.0}
    # the mean number of slots a patch moved: snake's slot of each patch against spiral's
    moved = [abs(list(now).index(p) - list(start).index(p)) for p in range(9)]
    assert line["order_shift"] == pytest.approx(sum(moved) / 9, rel=1e-6)
    assert sum(moved) == 24  # not the ids' difference (20), not argsort against ids (22)
    line = record(0, {"loss": 4.0, "correct": 1, "images": 8, "tau": 1.0, "steps": 2})
    assert (line["phase"], line["tau"], line["reward"], line["batch_noise"]) == (
        "fixed", 0.5, None, None)


def test_model_step_clips_the_gradient_to_clip_and_returns_the_norm_before():
    torch.manual_seed(0)
    model = reorder.ViT(reorder.vit_config("tiny", img_size=8, patch_size=4, dim=8, heads=2,
                                           depth=1))
    perms = torch.stack([reorder.order("row", 2, 2), reorder.order("column", 2, 2)])
    _, _, _, norm = train.model_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                     torch.amp.GradScaler("cpu", enabled=False),
                                     torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), perms, None,
                                     1e-3)
    after = torch.stack([p.grad.norm() for p in model.parameters()]).norm()
    assert norm > 0.1 and after == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("baseline", ["loo", "ema"])
def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch, baseline):
    # on a GPU each read of a tensor's value on the host waits for the queue to drain; a step
    # needs one (the loss and gradient norm finite, for the checkpoint guarantee). Counted here
    # on CPU: the reads of train.py and reorder.py in runs of 8 and 16 steps an epoch.
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
                 "numpy"):
        def counted(self, *a, real=getattr(torch.Tensor, name), **k):
            if os.path.basename(sys._getframe(1).f_code.co_filename) in ("train.py", "reorder.py"):
                reads.append(name)
            return real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for subset in (128, 256):
        reads.clear()
        run(tmp_path, "--epochs", "3", "--learn-order", "--subset", str(subset), "--save-every",
            "0", "--orders-per-step", "4" if baseline == "loo" else "1", "--baseline", baseline,
            name=f"{baseline}{subset}")
        counts.append(len(reads))
    assert counts[1] - counts[0] == 3 * 8  # 8 more steps in each of 3 epochs: one read each


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
                                             (20000, "last.pt", ["config.json", "train.lock"])])
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
    if left:  # issue 17, defect 6: a folder without a checkpoint has nothing to lose: usable
        again = subprocess.run(train_cmd(out, "--epochs", "1"), capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr


def slow_run(tmp_path, argv, delay=0.3, slow="model_step"):
    """train.py in a process of its own, each call of train.`slow` `delay` seconds slower: time
    to act on it."""
    script = tmp_path / "slow_run.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train\n"
        f"real = train.{slow}\n"
        f"train.{slow} = lambda *a: (time.sleep({delay}), real(*a))[1]\n"
        "train.main(sys.argv[1:])\n")
    return subprocess.Popen([sys.executable, str(script), *map(str, argv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, seconds=120):
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the test could act"


@pytest.mark.slow
def test_a_busy_run_folder_is_refused_with_its_pid_and_a_killed_runs_lock_is_not(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--save-every", "2", "--out", str(out)]
    first = slow_run(tmp_path, [*argv, "--workers", "2"])  # forked loader workers
    wait_for(lambda: (out / "last.pt").exists(), first)
    for extra in (["--resume"], ["--seed", "1"]):  # a second run, with or without --resume
        fails(capsys, [*argv, *extra], f"in use by process {first.pid}")
    first.send_signal(signal.SIGKILL)
    first.wait()
    # at once (issue 17, defect 5): the workers, still alive a while, do not hold the lock
    train.main([*argv, "--resume"])
    assert len(metrics(out)) == 2


@pytest.mark.slow
def test_a_run_still_setting_up_cannot_replace_a_run_that_finished_meanwhile(tmp_path, capsys):
    # issue 17, defect 1: the "already holds a run" check came before the lock, so a run busy
    # with its prior let a later run start and finish there, then replaced all of its files
    out = tmp_path / "run"
    slow = slow_run(tmp_path, [*TINY, "--epochs", "1", "--out", out], delay=5, slow="initial_order")
    wait_for(lambda: (out / "train.lock").exists(), slow)  # past its checks, setting up
    fails(capsys, [*TINY, "--epochs", "1", "--out", str(out)], f"in use by process {slow.pid}")
    assert slow.wait(timeout=300) == 0 and len(metrics(out)) == 1


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(tmp_path):
    out = run(tmp_path, "--epochs", "1")["out"]
    for name in ("last.pt.tmp", "metrics.jsonl.tmp"):
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
    (["--window", "-2"], "argument --window: must be at least 0, got -2"),
    (["--window", "wide"], "argument --window: expected an integer, got 'wide'"),
    (["--mixer", "mamba", "--window", "3"], "--window does not apply to --mixer mamba"),
    (["--mixer", "rnn"], "argument --mixer: invalid choice: 'rnn'"),
    (["--fixed-tau", "100"], "--fixed-tau samples orders from the policy: it needs --learn-order"),
    (["--learn-order", "--orders-per-step", "1", "--baseline", "loo"],
     "--baseline loo with --orders-per-step 1 needs --granularity image"),
    (["--learn-order", "--baseline", "ema"],
     "--baseline ema is the estimator of --orders-per-step 1"),
    (["--epochs", "4", "--learn-order", "--policy-start", "3", "--policy-epochs", "3"],
     "exceeds --epochs 4"),
    (["--resume"], "nothing to resume"),
    (["--batch-size", "1000"], "fewer than one batch"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a CUDA device")),
    (["--clip", "-1"], "argument --clip: must be > 0, got -1"),  # clip_grad_norm_ would flip it
    (["--clip", "0"], "argument --clip: must be > 0"),
    (["--lr", "-1"], "argument --lr: must be > 0"),
    (["--learn-order", "--granularity", "image", "--orders-per-step", "1", "--baseline", "loo",
      "--batch-size", "1"], "needs --granularity image and --batch-size 2 or more"),
    # issue 17, defect 8: these gave tracebacks, ran with NaN, or left a config.json
    (["--weight-decay", "-5"], "argument --weight-decay: must be at least 0, got -5"),
    (["--weight-decay", "nan"], "argument --weight-decay: must be finite, got nan"),
    (["--seed", "1e20"], "argument --seed: expected an integer, got '1e20'"),
    (["--seed", str(10 ** 20)], "argument --seed: must be at most"),
    (["--learn-order", "--policy-lr", "nan"], "argument --policy-lr: must be finite, got nan"),
    (["--learn-order", "--fixed-tau", "nan"], "argument --fixed-tau: must be finite, got nan"),
    (["--lr", "inf"], "argument --lr: must be finite, got inf"),
    (["--clip", "inf"], "argument --clip: must be finite, got inf"),
] + [([f"--{flag}", value], f"argument --{flag}: must be at least {low}") for flag, value, low in [
    ("orders-per-step", "0", 1), ("workers", "-1", 0), ("subset", "0", 1), ("val-subset", "0", 1),
    ("dim", "0", 1), ("heads", "0", 1), ("depth", "-1", 1), ("epochs", "0", 1),
    ("policy-start", "-1", 0), ("policy-lr", "-1", 0), ("fixed-tau", "-1", 0),
    ("seed", "-1", 0)]] + [([f"--{flag}", value], f"argument --{flag}: must be > 0")
                           for flag, value in [("tau-max", "0"), ("tau-max", "-0.2")]])
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
    fails(capsys, [*TINY, "--out", str(out), "--resume"], "is damaged (BadZipFile")
    assert (out / "last.pt").read_bytes() == b"\x00garbage"

    run(tmp_path, "--epochs", "1", name="good")
    before = (tmp_path / "good" / "last.pt").read_bytes()
    fails(capsys, [*TINY, "--out", str(tmp_path / "good"), "--epochs", "1", "--window", "3",
                   "--resume"],
          "does not match this run: it was trained with --window 7 (now 3)")
    fails(capsys, [*TINY, "--out", str(tmp_path / "good"), "--epochs", "1"], "already holds a run")
    assert (tmp_path / "good" / "last.pt").read_bytes() == before


EDITS = {  # a hand-edited last.pt, one epoch of two done (more in test_hostile.EDITS)
    "no scheduler": (lambda c: c.pop("scheduler"), "is damaged (ValueError: scheduler is missing"),
    "no start_perm": (lambda c: c.pop("start_perm"), "is damaged (ValueError: one order is a"),
    "no rng": (lambda c: c.pop("rng"), "is damaged (ValueError: rng is missing"),
    "no progress": (lambda c: c.pop("progress"), "is damaged (ValueError: progress is missing"),
    "pos_embed's shape": (lambda c: c["model"].update(pos_embed=torch.zeros(1, 3, 32)),
                          "is damaged (RuntimeError: Error(s) in loading state_dict for ViT"),
    # issue 17, defect 9: tracebacks, one of them after best.pt and metrics.jsonl were rewritten
    "epoch as text": (lambda c: c["progress"].update(epoch="1"), "is damaged (ValueError: progr"),
    "epoch past the end": (lambda c: c["progress"].update(epoch=3), "does not fit this run"),
    "step too far": (lambda c: c["progress"].update(done_in_epoch=8), "does not fit this run"),
    "step negative": (lambda c: c["progress"].update(done_in_epoch=-1), "does not fit this run"),
    "history short": (lambda c: c["progress"].update(history=[]), "does not fit this run"),
    "sums of two ranks": (lambda c: c["progress"]["sums"].append({}), "does not fit this run"),
    # issue 32: best.pt's epoch is one of the history; the start order one of its own grid
    "best past the history": (lambda c: c["progress"].update(best=1), "is damaged (ValueError: "
                              "progress is not"),
    "start_perm of another grid": (lambda c: c.update(start_perm=torch.arange(9)),
                                   "is damaged (ValueError: an order must be a LongTensor of "
                                   "shape [..., 16], got torch.int64 (9,)"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_checkpoint_is_one_line_and_nothing_is_written(tmp_path, capsys, edit):
    out = run(tmp_path, "--epochs", "2", "--save-every", "2")["out"]
    last = os.path.join(out, "last.pt")
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    ckpt = torch.load(last, weights_only=True) if ckpt["progress"]["epoch"] != 1 else ckpt
    ckpt["progress"].update(epoch=1, done_in_epoch=0, history=ckpt["progress"]["history"][:1],
                            best=0)
    EDITS[edit][0](ckpt)
    torch.save(ckpt, last)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    fails(capsys, [*TINY, "--epochs", "2", "--save-every", "2", "--out", out, "--resume"],
          EDITS[edit][1])
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


def test_an_order_file_is_checked_where_it_enters(tmp_path, capsys):
    path = tmp_path / "order.pt"
    for saved, message in [
            ({"perm": np.arange(16)}, "is not an order of 4 x 4 patches"),  # numpy: refused
            ({"perm": torch.arange(16.0), "grid": [4, 4]}, "torch.float32, not integers"),
            ({"perm": torch.arange(16), "grid": [2, 8]}, "saved for a 2 x 8 grid"),
            ({"perm": torch.arange(16) % 15, "grid": [4, 4]}, "not a permutation of 0..15")]:
        torch.save(saved, path)
        fails(capsys, [*TINY, "--order", str(path), "--out", str(tmp_path / "run")], message)
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_any_run_output_is_refused_and_no_advice_loses_work(tmp_path, capsys):
    out = run(tmp_path, "--epochs", "1")["out"]
    kept = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    with open(os.path.join(out, "last.pt"), "r+b") as f:  # last.pt torn, ...
        f.truncate(100)
    err = fails(capsys, [*TINY, "--epochs", "1", "--out", out, "--resume"], "is damaged")
    assert "delete" not in err and "another --out" in err
    os.remove(os.path.join(out, "last.pt"))  # ... then removed by hand, then a new run there
    err = fails(capsys, [*TINY, "--epochs", "1", "--seed", "1", "--out", out],
                "but no last.pt to resume: choose another --out")
    assert "delete" not in err
    for name, content in kept.items():
        if name != "last.pt":
            assert open(os.path.join(out, name), "rb").read() == content, name


def test_nan_at_the_first_step_leaves_a_folder_that_can_be_used_again(tmp_path, capsys):
    out = str(tmp_path / "run")
    err = fails(capsys, [*TINY, "--out", out, "--epochs", "1", "--lr", "1e30", "--save-every", "1",
                         "--clip", "1e30", "--weight-decay", "0"], "at step 1 (epoch 0): stopped")
    assert "no checkpoint was written" in err and "--resume" not in err
    assert sorted(os.listdir(out)) == ["config.json", "train.lock"]
    fails(capsys, [*TINY, "--out", out, "--epochs", "1", "--resume"], "nothing to resume")
    run(tmp_path, "--epochs", "1")  # issue 17, defect 6: a fresh start there works
    assert len(metrics(out)) == 1


def ruin_from(monkeypatch, n, how):
    """From the n-th model step on, the state gives a NaN loss ("loss": the weights blown up) or a
    finite loss whose gradients are NaN ("grad"), as --lr 100 once left."""
    real, steps = train.model_step, []

    def ruinous(model, *args):
        steps.append(1)
        if len(steps) == n:
            with torch.no_grad():
                if how == "loss":
                    for p in model.parameters():
                        p.mul_(1e30)
                else:
                    model.head.weight.register_hook(lambda g: g * float("nan"))
        return real(model, *args)
    monkeypatch.setattr(train, "model_step", ruinous)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nan_stop_keeps_the_last_state_that_gave_a_finite_loss_and_gradients(tmp_path, capsys,
                                                                              monkeypatch, how):
    # issue 17, defect 2: only the loss was checked, so a state with NaN gradients was saved
    # and every --resume stopped again at the same step
    ruin_from(monkeypatch, 5, how)
    argv = [*TINY, "--out", str(tmp_path / "run"), "--epochs", "1", "--save-every", "1"]
    err = fails(capsys, argv, "at step 4 (epoch 0): stopped")
    assert "last.pt holds epoch 0 after 3 of 8 steps" in err and "--resume" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["progress"][
        "done_in_epoch"] == 3
    monkeypatch.undo()
    train.main([*argv, "--resume"])  # from the state before: no NaN
    assert len(metrics(tmp_path / "run")) == 1


class Killed(BaseException):
    """SIGKILL at a chosen write, in-process."""


def kill_at_write(monkeypatch, name, nth):
    """The nth write of a file called `name` dies as a kill there would."""
    real, count = data.atomic_path, []

    @contextmanager
    def dying(path, *mode):
        if os.path.basename(path) == name:
            count.append(1)
            if len(count) == nth:
                raise Killed
        with real(path, *mode) as f:
            yield f
    monkeypatch.setattr(data, "atomic_path", dying)


def without_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.mark.parametrize("name", ["best.pt", "metrics.jsonl", "order.pt"])
def test_a_kill_while_the_last_epochs_outputs_are_written_is_redone_by_resume(
        tmp_path, monkeypatch, name):
    argv = ["--epochs", "3", "--lr", "3e-3", "--learn-order", "--policy-lr", "0.05"]
    whole = run(tmp_path, *argv, name="whole")["out"]
    tops = [line["val_top1"] for line in metrics(whole)]
    assert tops[-1] > max(tops[:-1]), "the last epoch must be the best, for best.pt to change"
    out = str(tmp_path / "killed")
    kill_at_write(monkeypatch, name, nth=3 if name != "best.pt" else
                  1 + sum(t == max(tops[:k + 1]) for k, t in enumerate(tops[:2])))
    with pytest.raises(Killed):
        run(tmp_path, *argv, name="killed")
    monkeypatch.undo()
    run(tmp_path, *argv, "--resume", name="killed")
    assert without_seconds(metrics(out)) == without_seconds(metrics(whole))
    a, b = (torch.load(os.path.join(d, "best.pt"), weights_only=True) for d in (whole, out))
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_refuses_or_applies_and_records_changed_flags(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = [*TINY, "--epochs", "2", "--learn-order", "--policy-lr", "0.05", "--out", out]
    kill_at_write(monkeypatch, "last.pt", nth=2)  # at the end of the second epoch
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


def test_help_groups_every_option_with_a_help_line_and_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    groups = ["data:", "model:", "order and policy:", "optimisation:", "run control:"]
    assert [line for line in text.splitlines() if line in groups] == groups
    lines = text.split("\n\ndata:\n")[1].splitlines()
    for i, line in enumerate(lines):  # a flag's help: after it on its line, or on the next one
        if line.startswith("  --"):
            assert "  " in line.strip() or lines[i + 1].startswith(" " * 10), line
    words = " ".join(text.split())
    for shown in ("--lr LR the model's AdamW learning rate (peak) (default: 0.0001)",
                  "--fixed-tau TAU > 0: before learning", "at this temperature (100: random "
                  "orders), so that the model learns to read other orders (default: 0.0)",
                  "--policy-start EPOCHS epochs on the fixed start order first (default: 15% of "
                  "--epochs)", "--seed N seeds the weights, the data order, the flips and the "
                  "sampled orders (default: 0)"):
        assert shown in words, shown


def test_metrics_are_strict_json(tmp_path):
    # issue 17, defect 8: NaN and Infinity are not JSON; a value that is not finite is null
    line = train.epoch_record(
        {"epoch": 0, "sums": {"loss": 1.0, "correct": 1, "images": 2, "tau": 0.0, "steps": 1},
         "changed": {}}, train.parse_args(["--epochs", "1"]), 1, float("nan"), 50.0, 1e-3,
        torch.arange(4), torch.arange(4), torch.device("cpu"), float("inf"))
    assert line["val_top1"] is None and line["seconds"] is None
    json.loads(json.dumps(line), parse_constant=lambda c: pytest.fail(c))


@pytest.mark.slow
@pytest.mark.parametrize("sig,save_every", [(signal.SIGINT, 500), (signal.SIGTERM, 500),
                                            (signal.SIGTERM, 0)])
def test_ctrl_c_and_sigterm_save_the_latest_step_and_say_where_resume_continues(
        tmp_path, sig, save_every):
    # issue 17, defects 3 and 4: SIGTERM was not handled, and Ctrl-C wrote only the last
    # checkpoint held back (with --save-every 500, none in an epoch of 128 steps)
    out = tmp_path / "run"
    argv = [*TINY, "--subset", "512", "--batch-size", "8", "--epochs", "1", "--save-every",
            save_every, "--out", out]  # 64 steps
    proc = slow_run(tmp_path, argv, delay=0.05)
    wait_for(lambda: (out / "config.json").exists(), proc)
    time.sleep(1.0)  # some steps into the epoch
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig and err.count("\n") == 1, err
    done = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert done["epoch"] == 0 and done["done_in_epoch"] > 0, done  # a step, not a held one
    assert (f"train.py: interrupted ({signal.Signals(sig).name}): --resume continues from epoch 0 "
            f"after {done['done_in_epoch']} of 64 steps") in err
    train.main([*map(str, argv), "--resume"])
    assert len(metrics(out)) == 1


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


def test_a_known_answer_run_shows_its_partners_each_epoch_and_says_if_it_reached_the_answer(
        tmp_path, capsys):
    from PIL import Image
    # two classes: no top-5; each epoch line counts the partners side by side, the last line says
    # whether the answer (all of them) was reached; order.png shows the start and the order now
    summary = train.main(["--data", "majority", "--subset", "64", "--val-subset", "32",
                          "--batch-size", "16", "--img-size", "16", "--patch", "4", "--depth", "2",
                          "--dim", "16", "--heads", "2", "--window", "1", "--order", "column",
                          "--epochs", "3", "--learn-order", "--quiet",
                          "--out", str(tmp_path / "r")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and not any("top-5" in line for line in lines)
    assert all("partners side by side 0/8 (start 0)" in line for line in lines[:3])
    assert lines[3].startswith("known answer not reached: 0 of 8 partners side by side (start 0)")
    assert [m["side_by_side"] for m in metrics(summary["out"])] == [0, 0, 0]
    two_panels = Image.open(os.path.join(summary["out"], "order.png")).size
    assert two_panels == (2 * (4 * 56 + 12) + 12, 4 * 56 + 30 + 12)
    assert Image.open(os.path.join(summary["out"], "curve.png")).size == (480, 300)


def perm_of(path):
    return torch.load(path, weights_only=True)["perm"]


# ---- issue 32: the run folder under kills, user files, links and removal; checkpoints; two ranks
# emulated in-process (train.RANK/WORLD and the collectives monkeypatched) ------------------------

@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_the_run_folder_removed_mid_run_is_one_line_and_what_was_saved_resumes(
        tmp_path, monkeypatch, capsys, how):
    # issue 32.4: the one-line error, then run_folder's cleanup raised again (two tracebacks)
    argv = [*TINY, "--epochs", "2", "--save-every", "3"]
    whole = run(tmp_path, *argv, name="whole")["out"]
    out, moved = tmp_path / "run", tmp_path / "moved"
    real = data.atomic_path

    @contextmanager
    def removing(path, *mode):
        if os.path.basename(path) == "best.pt" and out.exists():  # the first epoch's end
            shutil.rmtree(out) if how == "deleted" else out.rename(moved)
        with real(path, *mode) as f:
            yield f
    monkeypatch.setattr(data, "atomic_path", removing)
    err = fails(capsys, [*argv, "--out", str(out)], "cannot write")
    assert "Traceback" not in err and not out.exists()
    monkeypatch.undo()
    if how == "renamed":  # what was saved before: resumed
        train.main([*argv, "--out", str(moved), "--resume"])
        assert without_seconds(metrics(moved)) == without_seconds(metrics(whole))


def test_resume_with_another_image_size_is_another_run_not_damage(tmp_path, capsys):
    out = run(tmp_path, "--epochs", "1")["out"]
    err = fails(capsys, [*TINY, "--epochs", "1", "--out", out, "--resume", "--img-size", "32"],
                "does not match this run: it was trained with --img-size 16 (now 32)")
    assert "damaged" not in err


def die_at_write(monkeypatch, nth):
    """The nth file written (any name) dies as a SIGKILL there would: with a part of it written
    to name.tmp, which nothing removes."""
    real, count = data.atomic_path, []

    @contextmanager
    def dying(path, *mode):
        count.append(path)
        if len(count) == nth:
            with open(f"{path}.tmp", "wb") as f:
                f.write(b"PK\x03\x04 torn")
            raise Killed
        with real(path, *mode) as f:
            yield f
    monkeypatch.setattr(data, "atomic_path", dying)
    return count


def outcome(capsys, argv):
    """("resumed" | "fresh", the refusal of the other): --resume, else a fresh run."""
    try:
        train.main([*argv, "--resume"])
    except SystemExit:
        refused = capsys.readouterr().err
        assert "nothing to resume" in refused and "start without --resume" in refused, refused
        train.main(argv)
        return "fresh", refused
    refused = fails(capsys, argv, "already holds a run (last.pt): pass --resume")
    return "resumed", refused


# the writes of a fresh run to the first epoch's end, in order (docs/training.md)
FIRST_WRITES = ["config.json", "last.pt", "best.pt", "metrics.jsonl", "order.pt", "order.png",
                "curve.png"]
KILLED = [*TINY, "--epochs", "2", "--save-every", "0", "--learn-order", "--policy-lr", "0.05"]


@pytest.fixture(scope="module")
def unkilled(tmp_path_factory):
    return train.main([*KILLED, "--out", str(tmp_path_factory.mktemp("whole") / "run")])["out"]


@pytest.mark.parametrize("nth", range(1, len(FIRST_WRITES) + 1))
def test_a_kill_at_any_write_of_the_first_epoch_leaves_a_folder_resume_or_a_new_run_uses(
        tmp_path, monkeypatch, capsys, unkilled, nth):
    # issue 32.2: a kill after best.pt and before last.pt left a folder both refused
    out = str(tmp_path / "killed")
    written = die_at_write(monkeypatch, nth)
    with pytest.raises(Killed):
        train.main([*KILLED, "--out", out])
    assert [os.path.basename(p) for p in written] == FIRST_WRITES[:nth]
    monkeypatch.undo()
    how, _ = outcome(capsys, [*KILLED, "--out", out])
    assert how == ("fresh" if nth <= FIRST_WRITES.index("last.pt") + 1 else "resumed")
    assert "the run is complete" not in capsys.readouterr().out
    assert without_seconds(metrics(out)) == without_seconds(metrics(unkilled))
    assert sorted(os.listdir(out)) == sorted(os.listdir(unkilled))  # no name.tmp left
    a, b = (torch.load(os.path.join(d, "best.pt"), weights_only=True) for d in (unkilled, out))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_kill_while_the_pid_is_written_over_a_longer_one_leaves_a_lock_of_ours(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.lock").write_text("123456789012\n")  # a killed run's pid, longer than ours

    def killed(fd, length):
        raise Killed
    monkeypatch.setattr(os, "ftruncate", killed)  # the pid written, the rest not yet cut
    with pytest.raises(Killed):
        run(tmp_path, "--epochs", "1")
    monkeypatch.undo()
    assert (out / "train.lock").read_text().startswith(f"{os.getpid()}\n")
    assert outcome(capsys, [*TINY, "--epochs", "1", "--out", str(out)])[0] == "fresh"
    assert (out / "train.lock").read_text() == f"{os.getpid()}\n"  # cut to the pid


USERS = [("config.json", "{\"mine\": 1}"), ("prior.json", "[]"), ("order.png", "my picture"),
         ("curve.png", "my curve"), ("metrics.jsonl", "{}\n"), ("order.pt", "mine"),
         ("best.pt", "mine"), ("last.pt", "mine"), ("train.lock", "my notes\n"),
         ("train.lock", "1234567890\n" * 8),  # digits, but no pid: too long
         ("order.png", None)]  # None: a link to nowhere, the user's too


@pytest.mark.parametrize("name,content", USERS)
def test_a_new_run_replaces_no_file_it_did_not_write(tmp_path, capsys, name, content):
    # issue 32.3: the user's config.json, order.png, curve.png and train.lock were overwritten
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text(content) if content else (out / name).symlink_to(tmp_path / "no")
    before = snapshot(out)
    message = "holds something other than a pid" if name == "train.lock" else \
        "pass --resume" if name == "last.pt" else "but no last.pt to resume: choose another --out"
    for _ in range(2):  # the second time with the empty lock the first one left: still refused
        fails(capsys, [*TINY, "--epochs", "1", "--out", str(out)], message)
        assert {k: v for k, v in snapshot(out).items() if k != "train.lock" or
                name == "train.lock"} == before
    if name != "last.pt":
        err = fails(capsys, [*TINY, "--epochs", "1", "--out", str(out), "--resume"],
                    "nothing to resume" if name != "train.lock" else "other than a pid")
        assert "start without --resume" not in err


def test_resume_into_an_empty_existing_folder_keeps_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fails(capsys, [*TINY, "--epochs", "1", "--out", str(out), "--resume"],
          "nothing to resume")
    assert out.is_dir() and os.listdir(out) == ["train.lock"]  # made, and left: see run_folder
    fails(capsys, [*TINY, "--epochs", "1", "--out", str(tmp_path / "new"), "--resume"],
          "nothing to resume")
    assert not (tmp_path / "new").exists()  # made by the run, nothing written: removed


def test_a_train_lock_holding_a_longer_old_pid_is_cut_to_ours(tmp_path, capsys):
    out = run(tmp_path, "--epochs", "1", "--save-every", "3")["out"]
    with open(os.path.join(out, "train.lock"), "w") as f:
        f.write("99999999999999999\n")
    run(tmp_path, "--epochs", "1", "--save-every", "3", "--resume")
    assert open(os.path.join(out, "train.lock")).read() == f"{os.getpid()}\n"
    assert f"{out}: the run is complete (1 epochs)" in capsys.readouterr().out


def test_resume_reads_no_checkpoint_through_a_link(tmp_path, capsys):
    # issue 32.3: a last.pt linking to a checkpoint outside --out was resumed from
    elsewhere = run(tmp_path, "--epochs", "2", "--save-every", "3", name="elsewhere")["out"]
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.lock").write_text("999999\n")
    (out / "last.pt").symlink_to(os.path.join(elsewhere, "last.pt"))
    before = snapshot(tmp_path)
    fails(capsys, [*TINY, "--epochs", "2", "--save-every", "3", "--out", str(out), "--resume"],
          "last.pt is a symbolic link: --resume reads no checkpoint through a link")
    assert snapshot(tmp_path) == before
    with pytest.raises(OSError):  # the read itself follows no link either
        data.read_torch(str(out / "last.pt"), follow=False)
    assert data.read_torch(str(out / "last.pt"))["progress"]["epoch"] == 2


def fake_tops(monkeypatch, tops):
    """evaluate() gives these val top-1s, one per epoch, in turn."""
    tops = list(tops)
    monkeypatch.setattr(train, "evaluate", lambda *a: (tops.pop(0), 100.0))


def best_holds(out):
    """The epoch whose state best.pt holds."""
    return torch.load(os.path.join(out, "best.pt"), weights_only=True)["progress"]["epoch"] - 1


def test_best_pt_keeps_the_earlier_of_equal_epochs(tmp_path, monkeypatch):
    fake_tops(monkeypatch, [50.0, 50.0, 40.0])
    out = run(tmp_path, "--epochs", "3")["out"]
    assert best_holds(out) == 0
    fake_tops(monkeypatch, [40.0, 50.0, 50.0])
    assert best_holds(run(tmp_path, "--epochs", "3", name="later")["out"]) == 1


def test_a_deleted_best_pt_is_written_again_the_best_from_there_on(tmp_path, monkeypatch, capsys):
    argv = ["--epochs", "4", "--save-every", "0"]
    fake_tops(monkeypatch, [60.0, 40.0, 45.0])
    kill_at_write(monkeypatch, "last.pt", nth=3)  # last.pt: epochs 0 and 1 done, best.pt epoch 0
    with pytest.raises(Killed):
        run(tmp_path, *argv)
    monkeypatch.undo()
    out = tmp_path / "run"
    os.remove(out / "best.pt")
    fake_tops(monkeypatch, [45.0, 50.0])  # epoch 2 (again), 3: worse than 60, better than 40
    run(tmp_path, *argv, "--resume")
    assert best_holds(out) == 3  # written again at epoch 2, then replaced by the better 3
    # resumed at the end of the best epoch so far: its best.pt is written again at once
    kill_at_write(monkeypatch, "last.pt", nth=2)  # last.pt: epoch 0 done
    fake_tops(monkeypatch, [40.0, 30.0])
    with pytest.raises(Killed):
        run(tmp_path, *argv, name="again")
    monkeypatch.undo()
    os.remove(tmp_path / "again" / "best.pt")
    fake_tops(monkeypatch, [10.0, 10.0, 10.0])
    run(tmp_path, *argv, "--resume", name="again")
    assert best_holds(tmp_path / "again") == 0


@pytest.mark.parametrize("where", ["model.head.weight", "optimizer.state.0.exp_avg_sq"])
def test_a_checkpoint_holding_an_infinity_and_no_nan_is_damaged(tmp_path, capsys, where):
    out = run(tmp_path, "--epochs", "2", "--save-every", "3")["out"]
    last = os.path.join(out, "last.pt")
    ckpt = torch.load(last, weights_only=True)
    ckpt["progress"].update(epoch=1, done_in_epoch=3, history=ckpt["progress"]["history"][:1])
    t = ckpt["model"]["head.weight"] if where.startswith("model") else \
        ckpt["optimizer"]["state"][0]["exp_avg_sq"]
    t.view(-1)[0] = float("inf")
    torch.save(ckpt, last)
    fails(capsys, [*TINY, "--epochs", "2", "--save-every", "3", "--out", out, "--resume"],
          f"is damaged (ValueError: {where} holds a NaN or an infinity)")


def test_a_dangling_link_at_name_tmp_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    png = tmp_path / "orders.png"
    (tmp_path / "orders.png.tmp").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(data, "draw_orders", lambda *a, **k: pytest.fail("drawn"))
    fails(capsys, ["--draw-orders", str(png), "--img-size", "16", "--patch", "4"],
          "orders.png.tmp is in the way")
    assert sorted(os.listdir(tmp_path)) == ["orders.png.tmp"]


def test_batch_noise_is_zero_where_the_variance_rounds_below_zero():
    progress = {"epoch": 1, "sums": {}, "changed": {}}
    for _ in range(3):  # three steps with the same reward
        reward = torch.tensor(-0.1, dtype=torch.float64)
        train.add(progress, reward=reward, reward_sq=reward ** 2, neg_logp=1.0, spread=0.0,
                  policy_steps=1, loss=1.0, correct=1, images=2, tau=0.1, steps=1)
    s = progress["sums"]
    assert float(s["reward_sq"] / 3 - (s["reward"] / 3) ** 2) < 0  # rounds below zero
    args = SimpleNamespace(learn_order=True, policy_start=0, policy_epochs=2, tau_max=0.2,
                           fixed_tau=0.0)
    line = train.epoch_record(progress, args, 3, 50.0, 75.0, 1e-3, torch.arange(4),
                              torch.arange(4), torch.device("cpu"), 1.0)
    assert line["batch_noise"] == 0.0


def emulate_rank(monkeypatch, rank, world=2):
    """This process as rank `rank` of `world`: the collectives do nothing but what each test
    makes them do."""
    for name, value in (("RANK", rank), ("WORLD", world), ("WRITER", rank == 0)):
        monkeypatch.setattr(train, name, value)
    monkeypatch.setattr(train.dist, "broadcast_object_list", lambda objects, src: None)


def test_each_rank_resumes_its_own_running_sums(tmp_path, monkeypatch):
    out = run(tmp_path, "--epochs", "1", "--save-every", "3")["out"]
    last = os.path.join(out, "last.pt")
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["world"] = 2
    ckpt["progress"]["sums"] = [{"loss": 1.0}, {"loss": 2.0}]
    torch.save(ckpt, last)
    emulate_rank(monkeypatch, 1)
    args = train.parse_args([*TINY, "--epochs", "1", "--save-every", "3", "--out", out,
                             "--resume"])
    train_set, _, model = train.check_inputs(args, torch.device("cpu"))
    progress = train.begin(args, model, train_set, torch.device("cpu"), 4, lambda: None,
                           None)[1]
    assert progress["sums"] == {"loss": 2.0}


def test_the_ema_baseline_of_one_order_per_image_is_the_mean_over_ranks(monkeypatch):
    emulate_rank(monkeypatch, 0)
    monkeypatch.setattr(train.dist, "all_reduce",  # the other rank's mean reward: -4
                        lambda t, **k: t.add_(torch.tensor(-4.0, dtype=t.dtype)))
    seen, _ = reinforce_sees(monkeypatch, torch.tensor([[1.0, 3.0]]), "image", "ema")
    assert float(seen["baseline"]) == -3.0  # (-2 + -4) / 2, not this rank's -2


@pytest.mark.slow
def test_sigkill_as_soon_as_metrics_jsonl_appears_leaves_a_run_that_resume_continues(
        tmp_path, capsys):
    # issue 32.2 as reported: SIGKILL in epoch 0's end-of-epoch save, as soon as metrics.jsonl
    # appears, left best.pt and no last.pt, a folder both --resume and a new run refused
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--save-every", "0", "--out", str(out)]
    proc = slow_run(tmp_path, argv, delay=0.2)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert outcome(capsys, argv)[0] == "resumed"
    assert [line["epoch"] for line in metrics(out)] == [0, 1]
