"""Train a ViT with REOrder's curriculum: the loop, checkpoints, the command line.

    python train.py --order hilbert --learn-order                       # CIFAR-10 under ./data
    python train.py --data fashion-mnist --order row --learn-order --epochs 10
    torchrun --nproc_per_node=8 train.py --data imagenet --root /data/imagenet --model base \\
        --img-size 224 --patch 16 --window 7 --epochs 100 --learn-order --order hilbert
    python train.py --draw-orders orders.png --img-size 224 --patch 16   # a picture of the orders

Epochs [0, policy_start) train on the fixed start order; [policy_start, policy_start +
policy_epochs) sample orders from the Plackett-Luce policy and update model and policy together
while tau rises and falls 0 -> tau_max -> 0 per step; then the order is frozen at the policy's mode
and the model fine-tuned. Validation reads the mode. Ctrl-C or SIGTERM: the step under way
finishes, the state is saved, and --resume continues from it.
"""
import argparse
import dataclasses
import errno
import fcntl
import functools
import io
import json
import math
import os
import signal
import stat
import sys
import time
from contextlib import contextmanager, nullcontext, suppress

STOPPED = "train.py: interrupted (Ctrl-C) before training began: nothing was written"
try:  # torch takes seconds to load: Ctrl-C then is this line and status 130, not a traceback
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from tqdm import tqdm

    import data
    import prior
    import reorder
    from data import UsageError, number
except KeyboardInterrupt:
    print(STOPPED, file=sys.stderr)
    sys.exit(130)

# Set once, as nanoGPT does: torchrun's environment, else one process. Rank 0 prints and writes.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
WRITER = RANK == 0
# --resume refuses a change to any flag but these: the knobs to get past a NaN and where it runs
# (applied, and recorded in metrics.jsonl), and those that change no number.
RESUME_MAY_CHANGE = ("lr", "policy_lr", "weight_decay", "clip", "amp", "device", "compile")
NO_NUMBER = ("workers", "save_every", "quiet", "resume", "out", "draw_orders")
# What a run writes (each via name.tmp), in this order: config.json and prior.json once accepted;
# last.pt (its presence means "a run is here"), then at an epoch's end that epoch's outputs.
OUTPUTS = ("config.json", "prior.json", "last.pt", "best.pt", "metrics.jsonl", "order.pt",
           "order.png", "curve.png")

# --------------------------------------------------------------------------------------------------
# Steps: the curriculum, the classifier, the policy, validation
# --------------------------------------------------------------------------------------------------


def phase(step, args, steps_per_epoch):
    """("fixed" | "learn" | "finetune", tau) of a training step: the curriculum, in steps."""
    start, steps = args.policy_start * steps_per_epoch, args.policy_epochs * steps_per_epoch
    if not args.learn_order or step < start:
        return "fixed", args.fixed_tau  # > 0: orders sampled around the start
    if step < start + steps:
        return "learn", reorder.triangle_tau(step - start, steps, args.tau_max)
    return "finetune", 0.0


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up, then cosine down to 1% of the base rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def amp_dtype(flag, device):
    """The autocast dtype: none on CPU or with --amp off; bf16 where the GPU has it, else fp16."""
    if device.type != "cuda" or flag == "off":
        return None
    if flag == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def model_step(model, optimizer, scaler, images, labels, perms, dtype, clip):
    """The classifier's gradients on images read in order perms[0] ([N] or [B, N]), unscaled and
    clipped; perms[1:] only scored, with the same weights. The weights are not touched: the loop
    steps once loss and gradients are known finite. Returns (logits [K, B, classes], loss [K, B],
    the loss, the gradient norm before clipping), all on the device: nothing here waits for it."""
    with autocast(images.device, dtype):
        logits = [model(images, perms[0])]
    loss = F.cross_entropy(logits[0].float(), labels, reduction="none").mean()
    with torch.no_grad(), autocast(images.device, dtype):
        logits += [model(images, perm) for perm in perms[1:]]
    logits = torch.stack([x.detach().float() for x in logits])
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(logits)),
                             reduction="none").view(len(logits), -1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return logits, losses, loss.detach(), norm


def sample_orders(policy, k, tau, generator, images=None):
    """K orders by Gumbel-top-k at temperature tau, for the batch [K, N] or per image [K, B, N]:
    rank 0's, sent to every rank."""
    perms = policy.sample(k * (images or 1), tau, generator)[0]
    perms = perms.view(k, -1) if images is None else perms.view(k, images, -1)
    if WORLD > 1:
        dist.broadcast(perms, 0)
    return perms


def policy_optimizer(policy, lr):
    """SGD, not the paper's AdamW: Adam steps about lr whatever the gradient's size, so rewards
    that cannot tell orders apart still move the logits; SGD's step is proportional to the reward
    differences: no signal, no step (docs/training.md, what the policy needs)."""
    return torch.optim.SGD(policy.parameters(), lr=lr)


def policy_update(policy, policy_opt, perm, tau, reward, baseline):
    """One REINFORCE step (§5) on the orders `perm` and their rewards, scored under the current
    logits / tau; gradients averaged over ranks, clipped to 5. Returns log p(perm), detached."""
    log_prob = policy.log_prob(perm, tau, check=False)  # the policy's own samples
    policy_opt.zero_grad(set_to_none=True)
    reorder.reinforce_loss(log_prob, reward, baseline).backward()
    mean_over_ranks(policy.logits.grad)
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 5.0)
    policy_opt.step()
    return log_prob.detach()


def reinforce(args, state, perms, tau, logits, losses, labels, progress):
    """The policy's step: a reward per order (and image), its baseline, REINFORCE (§5)."""
    reward = -losses if args.reward == "xent" else (logits.argmax(-1) == labels) * 2. - 1
    if args.granularity == "batch":  # one order, one reward: [K, B] -> [K]
        reward = mean_over_ranks(reward.mean(1))
    if len(perms) > 1:  # leave-one-out over the K orders: the images' noise cancels
        baseline = reorder.loo_baseline(reward, dim=0)
    elif args.baseline == "ema":  # the paper's estimator, over every rank's images
        mean = reward.mean().double()  # an order per batch: already a mean over the ranks
        baseline = state["baseline"](mean if args.granularity == "batch" else mean_over_ranks(mean))
    else:  # one order per image, leave-one-out over the images
        baseline = reorder.loo_baseline(reward, dim=1)
    log_prob = policy_update(state["policy"], state["policy_opt"], perms, tau, reward, baseline)
    per_order = reward.mean(-1) if reward.dim() > 1 else reward  # [K]
    add(progress, reward=per_order[0], reward_sq=per_order[0].double() ** 2,
        spread=per_order.std() if len(perms) > 1 else 0.0, neg_logp=-log_prob.mean(),
        policy_steps=1)


def add(progress, **values):
    """The epoch's running sums: numbers, or float64 tensors left on the device (no wait)."""
    for k, v in values.items():
        v = v.detach().double() if torch.is_tensor(v) else v
        progress["sums"][k] = progress["sums"].get(k, 0.0) + v


def mean_over_ranks(t):
    """t averaged over the ranks, in place: each rank's gradients and rewards are of its images."""
    if WORLD > 1:
        dist.all_reduce(t)
        t /= WORLD
    return t


def evaluate(model, loader, perm, device, dtype):
    """(top-1 %, top-5 %) with one order for all images, over every rank's shard."""
    model.eval()
    hits, images = torch.zeros(2, device=device), 0  # top-1 and top-5 correct, images
    with torch.no_grad():
        for x, y in (batch for batch in loader if batch is not None):  # None: none readable
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = len(y)
            if n < loader.batch_size:  # a short batch padded: one shape, one torch.compile
                x = torch.cat([x, x.new_zeros(loader.batch_size - n, *x.shape[1:])])
            with autocast(device, dtype):
                logits = model(x, perm)[:n]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum()])
            images += n
    totals = torch.cat([hits, hits.new_tensor([images])])
    if WORLD > 1:
        dist.all_reduce(totals)
    model.train()
    return (100 * totals[0] / totals[2]).item(), (100 * totals[1] / totals[2]).item()


def epoch_record(progress, args, steps_per_epoch, top1, top5, lr, order_now, start_perm, device,
                 seconds, pairs=None):
    """The epoch's line of metrics.jsonl, from the sums over every rank's images (on a
    known-answer task, its `pairs`, also the partners side by side); a value that is not finite
    is written as null (strict JSON)."""
    s, n = progress["sums"], progress["sums"].get("policy_steps", 0)
    policy_keys = ("reward", "reward_sq", "neg_logp", "spread")
    totals = torch.stack([torch.as_tensor(s.get(k, 0.0), dtype=torch.float64, device=device)
                          for k in ("loss", "correct", "images") + policy_keys])
    if WORLD > 1:
        dist.all_reduce(totals)
        totals[3:] /= WORLD  # the policy's numbers: a mean over the ranks
    loss_sum, correct, images, *policy_sums = totals.tolist()
    mean = {k: v / n if n else None for k, v in zip(policy_keys, policy_sums)}
    record = {
        "epoch": progress["epoch"],
        "phase": phase(progress["epoch"] * steps_per_epoch, args, steps_per_epoch)[0],
        "train_loss": loss_sum / images, "train_top1": 100 * correct / images, "val_top1": top1,
        "val_top5": top5, "lr": lr, "tau": s["tau"] / s["steps"], "reward": mean["reward"],
        "entropy": mean["neg_logp"],  # Monte Carlo, at the tau used
        # order sensitivity: how far apart the K orders' rewards on the same images are, against
        # how far apart the rewards of different batches are (what an EMA baseline leaves)
        "order_spread": mean["spread"],
        "batch_noise": math.sqrt(max(0.0, mean["reward_sq"] - mean["reward"] ** 2)) if n else None,
        # mean number of slots a patch has moved since the start; argsort(perm) = each slot
        "order_shift": (order_now.argsort() - start_perm.argsort()).abs().float().mean().item(),
        "changed": progress["changed"], "seconds": seconds}
    if pairs is not None:
        record["side_by_side"] = data.side_by_side(order_now, pairs)
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def say_epoch(h, start_perm, classes, pairs):
    """The epoch's line on the terminal (on a known-answer task, its partners side by side)."""
    if WRITER:
        print(f"epoch {h['epoch']} {h['phase']}: train loss {h['train_loss']:.4f}, val top-1 "
              f"{h['val_top1']:.2f}" + (f" top-5 {h['val_top5']:.2f}" if classes >= 5 else "") +
              f", tau {h['tau']:.3f}, " + (f"partners side by side {h['side_by_side']}/"
              f"{len(pairs)} (start {data.side_by_side(start_perm, pairs)}), "
              if pairs is not None else "") +
              f"order shift {h['order_shift']:.2f}, {h['seconds']:.1f} s", flush=True)


def say_known_answer(order, start_perm, pairs, h):
    """The run's last line on a known-answer task: is every partner side by side?"""
    side = data.side_by_side(order, pairs)
    if WRITER:
        print(f"known answer {'reached' if side == len(pairs) else 'not reached'}: {side} of "
              f"{len(pairs)} partners side by side (start {data.side_by_side(start_perm, pairs)})"
              f", val top-1 {h['val_top1']:.2f}%")


# --------------------------------------------------------------------------------------------------
# Input checked before anything is written; the run folder and its checkpoint
# --------------------------------------------------------------------------------------------------

@contextmanager
def usage_errors():
    """reorder.py's ValueErrors (its checks of sizes, orders and windows) as one line."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_memory(args, cfg, device):
    """A one-line UsageError, before anything is built, where an estimate of the bytes the run holds
    at once, each term at most what it was measured to hold (tests/bench.py --only memory), exceeds
    the memory there is: the GPU's for the model, RAM for the rest; all RAM on a CPU. Bytes: 16 a
    weight (float32 weights, gradients, AdamW's two moments) of the layers' MLPs and mixers
    (2 x dim x hidden + 3 x dim², a lower count) and the patch and position embeddings; 4 a pixel
    of a batch and 16 a patch, hidden unit and layer kept for the backward pass (measured 18 to 42,
    window to bimamba); 48 a patch of each order sampled a step (measured 97); 8 an image of a
    generated set (the loader's shuffled index). docs/training.md, errors."""
    (h, w), p = reorder.grid_size(cfg.img_size, cfg.patch_size), cfg.patch_size
    n, hidden, batch = h * w, int(cfg.dim * cfg.mlp_ratio), args.batch_size
    orders = (args.orders_per_step if args.learn_order else 1) * (
        batch if args.granularity == "image" else 1)
    model = {"the weights (--dim, --depth, --img-size / --patch)":
             16 * cfg.dim * ((2 * hidden + 3 * cfg.dim) * cfg.depth + n + p * p),
             "a step's activations (--batch-size x patches x --dim x --depth)":
             4 * batch * n * (p * p + 4 * hidden * cfg.depth),
             "the orders sampled a step (--orders-per-step)": 48 * orders * n}
    rest = {"the images' index (--subset)": 8 * (args.data in data.GENERATED) * (args.subset or 0)}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    pools = [(model, torch.cuda.get_device_properties(device).total_memory, "the GPU"),
             (rest, ram, "RAM")] if device.type == "cuda" else [({**model, **rest}, ram, "RAM")]
    for need, have, where in pools:
        if sum(need.values()) > have:
            raise UsageError(f"this run needs at least {sum(need.values()) / 2 ** 30:.3g} GiB of "
                             f"{where}, which has {have / 2 ** 30:.3g} GiB: most for "
                             f"{max(need, key=need.get)}; lower those")


def check_inputs(args, device):
    """(train set, val set, model): the output folder, the memory the run needs, the data and the
    model, checked read-only."""
    data.check_writable(args.out)
    sizes = {k: getattr(args, k) for k in ("dim", "depth", "heads") if getattr(args, k)}
    with usage_errors():  # reorder.py's checks: sizes, window, width against heads
        grid = reorder.grid_size(args.img_size, args.patch)
        cfg = reorder.vit_config(args.model, img_size=args.img_size, patch_size=args.patch,
                                 mixer=args.mixer, window=args.window, **sizes)
    check_memory(args, cfg, device)
    if args.order not in reorder.ORDERS + ("random", "prior") and not args.resume:
        data.load_order(args.order, grid)  # checked now, loaded at the start (resumed: last.pt's)
    train_set = data.build_dataset(args.data, args.root, "train", args.img_size, augment=True,
                                   seed=args.seed, subset=args.subset, patch=args.patch)
    val_set = data.build_dataset(args.data, args.root, "val", args.img_size,
                                 subset=args.val_subset, patch=args.patch)
    if len(train_set) < args.batch_size * WORLD:
        raise UsageError(f"{len(train_set)} training images are fewer than one batch of "
                         f"{args.batch_size} x {WORLD} processes: lower --batch-size")
    if len({str(getattr(data.base_dataset(s), "classes", 0)) for s in (train_set, val_set)}) > 1:
        raise UsageError(f"train/ and val/ hold different class folders under {args.root}")
    firsts = [next(data.readable_items(dataset), None) for dataset in (train_set, val_set)]
    if None in firsts:
        raise UsageError(f"no readable image in the {('train', 'val')[firsts.index(None)]} split "
                         f"of --data {args.data} (each one is named above)")
    with usage_errors():
        return train_set, val_set, reorder.ViT(dataclasses.replace(
            cfg, in_chans=firsts[0][0].shape[0], num_classes=data.num_classes_of(train_set)))


@contextmanager
def run_folder(out):
    """The run folder, made and locked by rank 0 while the block runs: a POSIX record lock on
    out/train.lock, which the kernel drops when its process ends (SIGKILL too) and forked loader
    workers do not inherit. The lock file stays: removing it would let two runs lock two files.
    Yields (accept(), whether a run was accepted here before: a pid in the lock). accept() writes
    the pid into the lock and removes what a killed write left (data.atomic_path's name.tmp, by
    exact name): until the run is accepted, nothing in the folder changes but a lock file made
    where there was none."""
    if not WRITER:
        yield (lambda: None), None
        return
    created, path = not os.path.isdir(out), os.path.join(out, "train.lock")
    os.makedirs(out, exist_ok=True)
    try:  # never through a link (O_NOFOLLOW), nor into a FIFO, a device, a file with two names,
        # or a file of the user's (anything but a pid)
        lock = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        regular = stat.S_ISREG(os.fstat(lock).st_mode) and os.fstat(lock).st_nlink == 1
        held = os.pread(lock, 64, 0) if regular else b"?"
        if held.translate(None, b"0123456789\n") or len(held) > 32:  # a pid: 8 bytes at most
            os.close(lock)
            raise OSError("a file that holds something other than a pid" if regular else
                          "a FIFO, a device, or a file with a second name (a hard link)")
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else data.one_line(e)
        raise UsageError(f"cannot use {path} as this run's lock ({why}): a run writes through no "
                         f"link and into no file it did not make: choose another --out") from None
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.pread(lock, 32, 0).decode(errors="replace").strip() or "?"
        os.close(lock)
        raise UsageError(f"{out} is in use by process {pid}, a run writing there: wait for it "
                         f"to end, or choose another --out") from None

    def accept():  # the pid first, then the rest cut: a kill in between leaves only digits
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(lock, pid, 0)
        os.ftruncate(lock, len(pid))
        for name in OUTPUTS:  # what a write killed mid-way left (refusal: no folder in the way)
            with suppress(FileNotFoundError):
                os.remove(os.path.join(out, f"{name}.tmp"))
    try:
        yield accept, bool(held.strip())
    finally:
        os.close(lock)
        with suppress(OSError):  # the folder deleted or made read-only: the error is said once
            if created and os.listdir(out) == ["train.lock"]:  # made here, and nothing written
                os.remove(path)
                os.rmdir(out)


def refusal(out, resume, ran_here):
    """Why this run cannot use the folder `out`, each time saying what can; None if it can.
    last.pt means "a run is here": --resume continues it. A fresh run replaces no file it did
    not write: it needs none of OUTPUTS there, or only the config.json and prior.json of a run
    accepted here before (`ran_here`: its pid in the lock) that saved no last.pt."""
    at = functools.partial(os.path.join, out)
    found = [name for name in OUTPUTS if os.path.lexists(at(name))]
    fresh = set(found) <= ({"config.json", "prior.json"} if ran_here else set())
    in_way = [n for name in OUTPUTS for n in (name, f"{name}.tmp")
              if os.path.isdir(at(n)) and not os.path.islink(at(n))]
    if in_way:
        return f"{at(in_way[0])} is a folder where this run writes a file: move it, or choose " \
               f"another --out"
    if resume and os.path.islink(at("last.pt")):
        return f"{at('last.pt')} is a symbolic link: --resume reads no checkpoint through a " \
               f"link: copy the file there, or choose another --out"
    if resume and "last.pt" not in found:
        return f"nothing to resume: {at('last.pt')} does not exist" + (
            ": start without --resume (no run saved a state there)" if fresh else
            f", and {out} holds {', '.join(found)}: choose another --out (a run replaces no "
            f"file it did not write)")
    if not resume and "last.pt" in found:
        return f"{out} already holds a run (last.pt): pass --resume to continue it, or choose " \
               f"another --out"
    if not resume and not fresh:
        return f"{out} already holds {', '.join(found)}, files a run writes, but no last.pt " \
               f"to resume: choose another --out (a run replaces no file it did not write)"
    return None


def claim(args, steps_per_epoch, ran_here):
    """Under the lock: the checkpoint --resume continues, checked whole before anything is
    written; or None for a fresh run, in a folder where it replaces no file it did not write."""
    error, last = [refusal(args.out, args.resume, ran_here)], os.path.join(args.out, "last.pt")
    if WORLD > 1:  # rank 0's view of the folder decides for every rank
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UsageError(error[0])
    if not args.resume:
        return None
    try:
        ckpt = data.read_torch(last, follow=False)
        check_checkpoint(ckpt)
    except Exception as e:
        raise damaged(last, e) from None
    diff = [f"--{k.replace('_', '-')} {ckpt['config'].get(k)} (now {v})" for k, v in
            vars(args).items() if k not in RESUME_MAY_CHANGE + NO_NUMBER and
            ckpt["config"].get(k) != v]
    if diff:
        raise UsageError(f"checkpoint {last} does not match this run: it was trained with "
                         f"{', '.join(diff[:3])}: use the same flags or another --out")
    p = ckpt["progress"]
    if not (0 <= p["epoch"] <= args.epochs and len(p["history"]) == p["epoch"] and
            len(p["sums"]) == WORLD and
            0 <= p["done_in_epoch"] < (steps_per_epoch if p["epoch"] < args.epochs else 1)):
        raise UsageError(f"checkpoint {last} does not fit this run (its progress is no "
                         f"position in {args.epochs} epochs of {steps_per_epoch} steps)")
    return ckpt


def damaged(last, e):
    """The one line for a last.pt that cannot be resumed as it is."""
    return UsageError(f"checkpoint {last} is damaged ({data.one_line(e)}): train into another "
                      f"--out")


def check_checkpoint(ckpt):
    """A ValueError naming the first part of a checkpoint that train.py could not use as it is
    (hand-edited, or damaged where the zip's CRCs cannot see): what is loaded into an object is a
    dict, what train.py reads itself has its type (and is strict JSON where it is written again),
    the start order is one order of its grid, every floating tensor is finite."""
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    parts = ("model", "optimizer", "scheduler", "scaler", "baseline", "rng", "progress", "config")
    missing = [k for k in parts if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), dict)]
    if missing:
        raise ValueError(f"{missing[0]} is missing, or not a dict")
    p, baseline = ckpt["progress"], ckpt["baseline"]
    if not (type(p.get("epoch")) is type(p.get("done_in_epoch")) is int and isinstance(
            p.get("history"), list) and isinstance(p.get("sums"), list) and isinstance(
            p.get("changed"), dict) and type(p.get("best", 0)) is int and  # none before epoch 1
            0 <= p.get("best", 0) < max(1, len(p["history"]))):
        raise ValueError("progress is not {epoch: int, done_in_epoch: int, history: list, "
                         "sums: list, changed: dict, best: an epoch of history}")
    if not all(isinstance(row, dict) and row.get("epoch") == k and (row.get("val_top1", 0) is None
               or real(row.get("val_top1"))) for k, row in enumerate(p["history"])):
        raise ValueError("progress.history is not one dict of metrics per epoch")
    if not all(isinstance(rank, dict) and all(isinstance(k, str) and real(v) for k, v in
                                              rank.items()) for rank in p["sums"]):
        raise ValueError("progress.sums is not, for each rank, a dict of names to finite numbers")
    json.dumps([p, ckpt["config"]], allow_nan=False)  # written again: metrics.jsonl, last.pt
    config = ckpt["config"]  # its own grid: another run's is refused as another, not as damage
    data.check_order(ckpt.get("start_perm"), math.prod(reorder.grid_size(config.get("img_size"),
                                                                          config.get("patch"))))
    if not (real(baseline.get("momentum")) and (baseline.get("value") is None or real(
            baseline["value"])) and type(ckpt["scheduler"].get("last_epoch")) is int):
        raise ValueError("the baseline's momentum and value, or the scheduler's step, are no "
                         "numbers")
    for name, t in tensors(ckpt):  # a float64 sum: any NaN or inf shows, no float32 overflows
        if t.is_floating_point() and not t.sum(dtype=torch.float64).isfinite():
            raise ValueError(f"{name} holds a NaN or an infinity")


def tensors(obj, name=""):
    """(name, tensor) of every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    for key, value in obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(
            obj, (list, tuple)) else ():
        yield from tensors(value, f"{name}.{key}" if name else str(key))


def resume(state, ckpt, args, schedule, device, policy_gen):
    """{flag: [before, after]}: every object loaded from the checkpoint (a part that does not
    load, or loads with a tensor of the wrong shape, is damage); the flags of RESUME_MAY_CHANGE
    apply from here on."""
    try:
        for name, obj in state.items():
            if name != "scaler" or ckpt[name]:  # a run without fp16 saved no scaler
                obj.load_state_dict(ckpt[name])
        for opt in (state[k] for k in ("optimizer", "policy_opt") if k in state):
            if any(v.dim() and v.shape != p.shape for p, s in opt.state.items()
                   for v in s.values() if isinstance(v, torch.Tensor)):
                raise ValueError("an optimizer's state does not have its parameter's shape")
        torch.set_rng_state(ckpt["rng"]["cpu"])
        policy_gen.set_state(ckpt["rng"]["policy"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    except Exception as e:
        raise damaged(os.path.join(args.out, "last.pt"), e) from None
    state["scheduler"].base_lrs = [args.lr]
    for g in state["optimizer"].param_groups:
        g.update(lr=args.lr * schedule(state["scheduler"].last_epoch),
                 weight_decay=args.weight_decay)
    for g in state["policy_opt"].param_groups if "policy_opt" in state else ():
        g["lr"] = args.policy_lr
    changed = {k: [ckpt["config"].get(k), getattr(args, k)] for k in RESUME_MAY_CHANGE
               if ckpt["config"].get(k) != getattr(args, k)}
    if changed and WRITER:
        print("--resume with " + ", ".join(f"--{k.replace('_', '-')} {new} (was {old})"
                                           for k, (old, new) in changed.items()))
    return changed


def checkpoint(state, meta, progress, rng):
    """Everything --resume needs, in one dict. The epoch's running sums are each rank's own (of
    its images), so the checkpoint holds every rank's: [world] dicts."""
    sums = [{k: float(v) for k, v in progress["sums"].items()}]
    if WORLD > 1:
        own, sums = sums[0], [None] * WORLD
        dist.all_gather_object(sums, own)
    return {**{k: v.state_dict() for k, v in state.items()}, **meta,
            "progress": {**progress, "sums": sums}, "rng": rng}


def best_epoch(progress, out):
    """The epoch whose state best.pt holds once the last epoch of `progress` is saved: that
    epoch if its val top-1 beats the one best.pt holds (a tie keeps the earlier epoch), or if
    there is none yet or best.pt is gone (deleted: written again, the best from there on)."""
    history, best = progress["history"], progress.get("best")
    top = [-1 if line["val_top1"] is None else line["val_top1"] for line in history]
    if best is None or top[-1] > top[best] or not os.path.lexists(os.path.join(out, "best.pt")):
        return len(history) - 1
    return best


def save(out, ckpt, grid, order_now=None, pairs=None):
    """last.pt, the whole state in one dict, written atomically by rank 0; at an epoch's end
    (order_now given) then that epoch's outputs: best.pt if it holds this epoch, metrics.jsonl,
    order.pt, order.png (the start and this order; `pairs` marked on a known-answer task),
    curve.png. A kill before they are all written leaves last.pt at the epoch's end, from which
    --resume writes them again."""
    if not WRITER:
        return
    buffer = io.BytesIO()  # serialized once, for last.pt and best.pt
    torch.save(ckpt, buffer)
    data.atomic_save(buffer.getvalue(), os.path.join(out, "last.pt"))
    if order_now is not None:
        history = ckpt["progress"]["history"]
        if ckpt["progress"].get("best") == len(history) - 1:
            data.atomic_save(buffer.getvalue(), os.path.join(out, "best.pt"))
        with data.atomic_path(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in history)
        data.save_order(os.path.join(out, "order.pt"), order_now, grid)
        orders = {f"start: {ckpt['order_name']}": ckpt["start_perm"],
                  f"{'learned' if 'policy' in ckpt else 'fixed'}, epoch {len(history) - 1}":
                  order_now.cpu()}
        if pairs is not None:  # how many partners each order puts side by side
            orders = {f"{title}, {data.side_by_side(perm, pairs)}/{len(pairs)} side by side":
                      perm for title, perm in orders.items()}
        with data.atomic_path(os.path.join(out, "order.png")) as f:
            data.draw_orders(f, grid, orders, pairs=pairs)
        with data.atomic_path(os.path.join(out, "curve.png")) as f:
            data.draw_curve(f, history, 0 if pairs is None else len(pairs))


@contextmanager
def signals_to_flag():
    """Ctrl-C (SIGINT) and SIGTERM (what a scheduler sends before SIGKILL) only set a flag: the
    loop finishes its step, saves and exits. A second one ends the process at once (until the
    state is saved: interrupted() then ignores both, and they stay ignored while it exits)."""
    caught = []

    def handler(signum, frame):
        caught.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, h)


def ignore_signals(worker_id):
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which ends them."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------
# Setting up: the device, the start order, loaders, the state a checkpoint holds
# --------------------------------------------------------------------------------------------------

def setup_device(flag):
    """This process's device; under torchrun one per rank, its process group started."""
    flag = ("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device here: use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if WORLD > 1 and flag == "cuda":
        torch.cuda.set_device(local)
    if WORLD > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if flag == "cuda" else "gloo")
    return torch.device(f"cuda:{local}" if WORLD > 1 and flag == "cuda" else flag)


def initial_order(args, grid, train_set):
    """(perm, name, prior table or None): the start order, by name, "prior" (prior.py's pick on a
    training sample, measured on rank 0), or a saved order's path."""
    if args.order != "prior":
        return (reorder.order(args.order, *grid, seed=args.seed) if args.order in reorder.ORDERS
                + ("random",) else data.load_order(args.order, grid)), args.order, None
    pick, table = [None], None
    if WRITER:
        images = prior.sample_images(train_set.dataset, args.prior_n, args.seed)  # unflipped
        table = prior.compressibility(images, args.patch, seed=args.seed, progress=not args.quiet)
        print(prior.format_table(table))
        pick[0] = prior.pick(table)
    if WORLD > 1:
        dist.broadcast_object_list(pick, src=0)
    if pick[0] is None:
        raise UsageError("--order prior: a tie, no one ordering is the least compressible on "
                         "these images, so the prior picks none: give --order yourself")
    if WRITER:
        print(f"--order prior: starting from {pick[0]}, the least compressible ordering")
    return reorder.order(pick[0], *grid), f"prior:{pick[0]}", table


def make_loader(dataset, args, device, shuffle=True, epoch=0, skip=0):
    """A loader over this rank's shard (DistributedSampler: a shuffle seeded by seed and epoch),
    `skip` batches in (a resumed epoch); loader workers only for image folders."""
    shard = DistributedSampler(dataset, WORLD, RANK, shuffle=shuffle, seed=args.seed,
                               drop_last=shuffle)
    shard.set_epoch(epoch)
    workers = args.workers if args.workers is not None else \
        min(8, os.cpu_count() or 1) if args.data in ("imagenet", "fmow", "folder") else 0
    return DataLoader(Subset(dataset, list(shard)[skip * args.batch_size:]), args.batch_size,
                      drop_last=shuffle, num_workers=workers, pin_memory=device.type == "cuda",
                      collate_fn=data.collate_skipping_none, worker_init_fn=ignore_signals)


def begin(args, model, train_set, device, steps_per_epoch, accept, ran_here):
    """Under the lock: (state, progress, meta, policy generator, resumed). The state holds every
    object a checkpoint restores, by name; meta, what it keeps besides (start order, flags).
    accept() (run_folder's) once the folder holds no work (a fresh run), or once the checkpoint
    is loaded into every object (--resume): before, nothing is written."""
    ckpt = claim(args, steps_per_epoch, ran_here)  # what --resume continues, or None
    if ckpt is None:
        accept()
    start_perm, order_name, prior_table = (ckpt["start_perm"], ckpt.get("order_name"), None) \
        if ckpt else initial_order(args, model.grid, train_set)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = functools.partial(lr_factor, warmup_steps=args.warmup_epochs * steps_per_epoch,
                                 total_steps=args.epochs * steps_per_epoch)
    state = {"model": model, "optimizer": optimizer,
             "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
             "scaler": torch.amp.GradScaler(device.type, enabled=amp_dtype(args.amp, device)
                                            == torch.float16),
             "baseline": reorder.EMABaseline(0.99)}
    if args.learn_order:  # the policy stays float32 under AMP
        state["policy"] = reorder.PlackettLuce.from_order(start_perm).to(device)
        state["policy_opt"] = policy_optimizer(state["policy"], args.policy_lr)
    policy_gen = torch.Generator().manual_seed(args.seed + 1)  # CPU: the same orders anywhere
    progress = {"epoch": 0, "done_in_epoch": 0, "history": [], "sums": {}, "changed": {}}
    if ckpt:
        changed = resume(state, ckpt, args, schedule, device, policy_gen)
        accept()
        progress = {**ckpt["progress"], "sums": ckpt["progress"]["sums"][RANK],
                    "changed": {**ckpt["progress"]["changed"], **changed}}
    else:
        write_config(args, model, order_name, steps_per_epoch, prior_table)
    meta = {"start_perm": start_perm.cpu(), "order_name": order_name, "config": vars(args)}
    return state, progress, meta, policy_gen, ckpt is not None


def rng_state(device, policy_gen):
    """The random streams a resumed run continues (data order and flips are functions of seed,
    epoch and index)."""
    return {"cpu": torch.get_rng_state(), "policy": policy_gen.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def write_config(args, model, order_name, steps_per_epoch, prior_table):
    """config.json (the flags, the model, the start order) and prior.json of a fresh run."""
    config = {**vars(args), "order_name": order_name, "vit": dataclasses.asdict(model.cfg),
              "steps_per_epoch": steps_per_epoch}
    for name, content in (("config.json", config), ("prior.json", prior_table)):
        if content and WRITER:
            with data.atomic_path(os.path.join(args.out, name), "w") as f:
                json.dump(content, f, indent=1)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def train(args):
    """Run (or resume) training; returns a summary dict (final metrics, order, policy logits)."""
    device = setup_device(args.device)
    torch.manual_seed(args.seed)
    train_set, val_set, model = check_inputs(args, device)
    grid, model, dtype = model.grid, model.to(device), amp_dtype(args.amp, device)
    val_loader = make_loader(val_set, args, device, shuffle=False)
    steps_per_epoch = len(make_loader(train_set, args, device))
    with run_folder(args.out) as (accept, ran_here), signals_to_flag() as caught:
        state, progress, meta, policy_gen, resumed = begin(args, model, train_set, device,
                                                           steps_per_epoch, accept, ran_here)
        optimizer, scheduler, scaler, policy = map(state.get, ("optimizer", "scheduler", "scaler",
                                                               "policy"))
        start_perm = meta["start_perm"].to(device)
        net = torch.compile(model) if args.compile else model
        net = torch.nn.parallel.DistributedDataParallel(net) if WORLD > 1 else net
        current_order = policy.mode if policy is not None else (lambda: start_perm)
        # a known-answer task (data.PairImages): its answer puts every pair side by side
        classes, pairs = model.cfg.num_classes, getattr(data.base_dataset(train_set), "pairs", None)
        # where last.pt is; a checkpoint asked for: "step", or "epoch" (with the epoch's outputs:
        # resumed at an epoch's end, they are written again, as a kill may have cut them short)
        saved = (progress["epoch"], progress["done_in_epoch"]) if resumed else None
        due = "epoch" if saved and saved[0] and not saved[1] else None
        while progress["epoch"] < args.epochs:
            t0, epoch = time.time(), progress["epoch"]
            train_set.epoch = epoch  # the flips of this epoch
            bar = tqdm(make_loader(train_set, args, device, True, epoch, progress["done_in_epoch"]),
                       f"epoch {epoch}", steps_per_epoch, initial=progress["done_in_epoch"],
                       leave=False, disable=not WRITER or args.quiet)
            for batch in bar:
                step = epoch * steps_per_epoch + progress["done_in_epoch"]
                rng = rng_state(device, policy_gen)  # what a checkpoint of this point restores
                if batch is None:  # every image of it was unreadable (each one warned)
                    progress["done_in_epoch"] += 1
                    continue
                x, y = (t.to(device, non_blocking=True) for t in batch)
                stage, tau = phase(step, args, steps_per_epoch)

                # 1. the orders: while learning, K samples of the policy (rank 0's) for the batch
                #    [K, N] or per image [K, B, N]; before, the start (or, at --fixed-tau, samples
                #    around it); after, the policy's mode
                if tau > 0:
                    perms = sample_orders(policy, args.orders_per_step if stage == "learn" else 1,
                                          tau, policy_gen,
                                          len(y) if args.granularity == "image" else None)
                else:
                    perms = current_order()[None]

                # 2. the classifier's gradients on the first order; the others only scored
                logits, losses, loss, norm = model_step(net, optimizer, scaler, x, y, perms, dtype,
                                                        args.clip)
                loss, norm, finite, signum = agree(caught, loss, norm, scaler.is_enabled(),
                                                   device)  # fp16: the scaler skips inf steps
                if not finite:
                    raise nan_stop(args, loss, norm, step, epoch, saved, steps_per_epoch)

                # 3. the state before this step gave a finite loss and gradients: write the
                #    checkpoint asked for now (and at Ctrl-C or SIGTERM, then exit); then step
                if due or signum:
                    save(args.out, checkpoint(state, meta, progress, rng), grid,
                         current_order() if due == "epoch" else None, pairs)
                    saved, due = (epoch, progress["done_in_epoch"]), None
                if signum:
                    interrupted(signum, args.out, saved, steps_per_epoch)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                # 4. REINFORCE (§5): the policy learns from the rewards of the K orders
                if stage == "learn":
                    reinforce(args, state, perms, tau, logits, losses, y, progress)

                # 5. bookkeeping; a checkpoint every --save-every steps
                add(progress, loss=loss * len(y), correct=(logits[0].argmax(1) == y).sum(),
                    images=len(y), tau=tau, steps=1)
                progress["done_in_epoch"] += 1
                bar.set_postfix(loss=f"{loss:.3f}", tau=f"{tau:.3f}")
                if args.save_every and progress["done_in_epoch"] % args.save_every == 0 \
                        and progress["done_in_epoch"] < steps_per_epoch:
                    due = "step"

            # ---- end of epoch: validate and log; the checkpoint waits for the next step's check
            order_now = current_order()
            top1, top5 = evaluate(net, val_loader, order_now, device, dtype)
            progress["history"].append(epoch_record(
                progress, args, steps_per_epoch, top1, top5, scheduler.get_last_lr()[0],
                order_now, start_perm, device, time.time() - t0, pairs))
            progress.update(epoch=epoch + 1, done_in_epoch=0, sums={}, changed={},
                            best=best_epoch(progress, args.out))
            due = "epoch"
            say_epoch(progress["history"][-1], start_perm, classes, pairs)
        if due:  # the last epoch: there is no later step to wait for
            save(args.out, checkpoint(state, meta, progress, rng_state(device, policy_gen)), grid,
                 current_order(), pairs)
        if WRITER and saved == (args.epochs, 0):
            print(f"{args.out}: the run is complete ({args.epochs} epochs)")
        if pairs is not None:
            say_known_answer(current_order(), start_perm, pairs, progress["history"][-1])
    return {"out": args.out, "history": progress["history"], "order": current_order().cpu(),
            "policy_logits": policy.logits.detach().cpu() if policy is not None else None}


def agree(caught, loss, norm, fp16, device):
    """The step's one wait for the device: (this rank's loss and gradient norm, both finite on
    every rank, the signal any rank caught or 0): a NaN or a signal on one rank stops them all.
    Under fp16 the gradient scaler skips the steps whose gradients are not finite itself."""
    bad = ~loss.isfinite() | ~(norm.isfinite() | fp16)
    signum = torch.full((), float(caught[0] if caught else 0), dtype=torch.float64, device=device)
    status = torch.stack([loss.double(), norm.double(), bad.double(), signum])
    if WORLD > 1:
        dist.all_reduce(status[2:], op=dist.ReduceOp.MAX)
    loss, norm, bad, signum = status.tolist()
    return loss, norm, not bad, int(signum)


def nan_stop(args, loss, norm, step, epoch, saved, steps_per_epoch):
    """The one-line stop for a loss or gradient that is not finite (the weights are untouched)."""
    return UsageError(
        f"loss {loss}, gradient norm {norm} at step {step} (epoch {epoch}): stopped; " +
        (f"{args.out}/last.pt holds epoch {saved[0]} after {saved[1]} of {steps_per_epoch} steps, "
         f"a state with a finite loss and gradients: --resume with a lower --lr (or --amp bf16/"
         f"off)" if saved else "no checkpoint was written: start again with a lower --lr (the "
         f"folder holds no work to lose)"))


def interrupted(signum, out, saved, steps_per_epoch):
    """After Ctrl-C or SIGTERM to any rank, the state saved: one line on where --resume continues,
    and every rank ends with status 128 + signum. From here further signals are ignored: no rank
    ends before the writer has saved, nor is cut short by torchrun's SIGTERM to the last ones."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if WORLD > 1:
        dist.barrier()
    if WRITER:
        print(f"train.py: interrupted ({signal.Signals(signum).name}): --resume continues from "
              f"epoch {saved[0]} after {saved[1]} of {steps_per_epoch} steps ({out}/last.pt)",
              file=sys.stderr)
    sys.exit(128 + signum)


# --------------------------------------------------------------------------------------------------
# Command line: every number checked where it is parsed
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = data.OneLineParser(description=__doc__, formatter_class=data.HelpFormatter)
    count, whole, positive, nonneg = number(int, 1), number(int, 0), number(above=0), number(low=0)
    cores = number(int, 0, high=data.CORES, why=data.ON_CORES)
    a = ap.add_argument_group("data").add_argument
    a("--data", default="cifar10", choices=data.DATASETS,
      help="the data set; pairs, neighbours, majority: known-answer tasks (data.PairImages)")
    a("--root", metavar="DIR", help="data folder (default: cifar10 ./data; fashion-mnist Debian's "
                                    "dataset-fashion-mnist, else ./data; folders: required)")
    a("--subset", type=count, metavar="K", help="train on a fixed random subset of K images "
                                                "(default: all)")
    a("--val-subset", type=count, metavar="K", help="validate on a fixed random subset of K "
                                                    "images (default: all)")
    a("--img-size", type=count, default=32, metavar="PX", help="image side, after resizing")
    a("--patch", type=count, default=4, metavar="PX", help="patch side: a grid of img-size / patch")
    a("--workers", type=cores, metavar="N", help="loader processes (default: 0 for data in "
                                                 "memory, up to 8 for image folders)")
    a = ap.add_argument_group("model").add_argument
    a("--model", default="tiny", choices=sorted(reorder.PRESETS),
      help="size preset: tiny 192 wide, small 384, base 768 (the paper's); 12 layers each")
    a("--dim", type=count, metavar="N", help="width (default: the preset's, 192 / 384 / 768)")
    a("--depth", type=count, metavar="N", help="layers (default: the preset's, 12)")
    a("--heads", type=count, metavar="N", help="attention heads (default: the preset's, 3 / 6 / "
                                               "12)")
    a("--mixer", default="window", choices=reorder.MIXERS,
      help="window (Longformer), causal (Transformer-XL), mamba (one scan), bimamba (the paper's "
           "Mamba: four scans)")
    a("--window", default="auto", metavar="N", type=lambda t: t.lower() if t.lower() in (
        "none", "auto") else whole(t), help="window: attention reaches ±N slots (auto: 7, the "
      "paper's; none: full attention); causal: the N earlier slots (auto: all)")
    a = ap.add_argument_group("order and policy").add_argument
    a("--order", default="row", help=f"start order: {', '.join(reorder.ORDERS)}, random, prior "
                                     f"(prior.py's pick on a training sample), or a saved order.pt")
    a("--prior-n", type=count, default=512, metavar="N", help="images sampled for --order prior")
    a("--learn-order", action="store_true", help="learn the order with the Plackett-Luce policy "
                                                 "(the curriculum); without it the order is fixed")
    a("--policy-start", type=whole, metavar="EPOCHS",
      help="epochs on the fixed start order first (default: 15%% of --epochs)")
    a("--policy-epochs", type=count, metavar="EPOCHS",
      help="epochs of order learning (default: 30%% of --epochs)")
    a("--tau-max", type=positive, default=0.2, metavar="TAU",
      help="peak of the temperature, which rises 0 -> TAU -> 0 per step while learning")
    a("--fixed-tau", type=nonneg, default=0.0, metavar="TAU",
      help="> 0: before learning, train on orders sampled around the start at this temperature "
           "(100: random orders), so that the model learns to read other orders")
    a("--orders-per-step", type=count, default=4, metavar="K",
      help="K orders scored on the same images each learning step (1: the paper's estimator)")
    a("--policy-lr", type=nonneg, default=0.01, metavar="LR",
      help="the policy's SGD rate (0: frozen, a control)")
    a("--reward", default="xent", choices=["xent", "binary"],
      help="reward of an order: -cross-entropy, or ±1 right/wrong")
    a("--baseline", choices=["ema", "loo"],
      help="K > 1: leave-one-out over the orders (default); K = 1: the paper's EMA (0.99, "
           "default), or leave-one-out over the images (with --granularity image)")
    a("--granularity", default="batch", choices=["batch", "image"],
      help="one sampled order per batch, or one per image")
    a = ap.add_argument_group("optimisation").add_argument
    a("--epochs", type=count, default=100, metavar="N", help="epochs in all, the phases together")
    a("--batch-size", type=count, default=128, metavar="N", help="images per step, per process")
    a("--lr", type=positive, default=1e-4, metavar="LR",
      help="the model's AdamW learning rate (peak)")
    a("--weight-decay", type=nonneg, default=0.03, metavar="WD",
      help="the model's AdamW weight decay")
    a("--warmup-epochs", type=whole, metavar="EPOCHS", help="linear warm-up, then cosine to 1%% "
                                                            "of --lr (default: 5%% of --epochs)")
    a("--clip", type=positive, default=5.0, metavar="NORM", help="the model's gradient norm clip")
    a("--seed", type=number(int, 0, high=2 ** 32 - 2), default=0, metavar="N",
      help="seeds the weights, the data order, the flips and the sampled orders")
    a = ap.add_argument_group("run control").add_argument
    a("--out", metavar="DIR", help="run folder (default: runs/<data>-<order>[-<mixer>][-learn]-"
                                   "s<seed>)")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--save-every", type=whole, default=500, metavar="N",
      help="also checkpoint every N steps (0: at epochs only)")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"],
      help="auto: cuda where torch sees a GPU")
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
      help="autocast on CUDA (auto: bf16 where supported, else fp16); none on CPU")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--quiet", action="store_true", help="no progress bars")
    a("--draw-orders", metavar="PNG", help="only draw the orderings (and --order if a file) on "
                                           "the grid of --img-size / --patch into one PNG")
    return settle(ap.parse_args(argv), ap.error)


def settle(args, e):
    """The defaults that depend on other flags, and the checks across flags (`e`: one line, exit
    status 2)."""
    args.baseline = args.baseline or ("ema" if args.orders_per_step == 1 else "loo")
    if "mamba" in args.mixer and args.window != "auto":
        e(f"--window does not apply to --mixer {args.mixer} (a scan reads the whole sequence)")
    args.window = {"auto": 7 if args.mixer == "window" else None, "none": None}.get(
        args.window, args.window)
    if args.policy_start is None:
        args.policy_start = max(1, round(0.15 * args.epochs)) if args.epochs >= 3 else 0
    if args.policy_epochs is None:  # leave a fine-tuning epoch
        room = args.epochs - args.policy_start - (args.epochs >= 3)
        args.policy_epochs = max(1, min(round(0.30 * args.epochs), room))
    if args.warmup_epochs is None:
        args.warmup_epochs = round(0.05 * args.epochs)
    args.out = args.out if args.out is not None else os.path.join("runs", "-".join(
        [args.data, args.order.replace(os.sep, "_")] + [args.mixer] * (args.mixer != "window")
        + ["learn"] * args.learn_order + [f"s{args.seed}"]))  # "": check_writable refuses it
    args.world = WORLD
    if args.lr * args.weight_decay > 1:
        e(f"--lr {args.lr} x --weight-decay {args.weight_decay} exceeds 1: AdamW multiplies every "
          f"weight by 1 - lr x weight decay each step, which would flip its sign")
    if args.fixed_tau and not args.learn_order:
        e("--fixed-tau samples orders from the policy: it needs --learn-order")
    if args.learn_order and args.policy_start + args.policy_epochs > args.epochs:
        e(f"--policy-start {args.policy_start} + --policy-epochs {args.policy_epochs} exceeds "
          f"--epochs {args.epochs}")
    if args.learn_order and args.orders_per_step > 1 and args.baseline == "ema":
        e("--baseline ema is the estimator of --orders-per-step 1; with more orders the "
          "baseline is leave-one-out over them")
    if args.learn_order and args.orders_per_step == 1 and args.baseline == "loo" and (
            args.granularity != "image" or args.batch_size < 2):
        e("--baseline loo with --orders-per-step 1 needs --granularity image and --batch-size 2 "
          "or more: it compares each image with the others of its batch")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if not args.draw_orders:
            return train(args)
        with usage_errors():
            grid = reorder.grid_size(args.img_size, args.patch)
        if max(grid) > 256:  # 6 pixels a patch: 1,536 a side, 4 x 2 such pictures on one sheet
            raise UsageError(f"--draw-orders draws at most 256 patches a side, got {grid[0]} x "
                             f"{grid[1]}: choose a larger --patch")
        orders = {name: reorder.order(name, *grid) for name in reorder.ORDERS}
        orders[f"random (seed {args.seed})"] = reorder.order("random", *grid, seed=args.seed)
        if args.order not in reorder.ORDERS + ("random", "prior"):  # a file: checked, drawn
            orders[os.path.basename(os.path.dirname(os.path.abspath(args.order))) or args.order] = \
                data.load_order(args.order, grid)
        data.check_writable(args.draw_orders, file=True)
        os.makedirs(os.path.dirname(args.draw_orders) or ".", exist_ok=True)
        with data.atomic_path(args.draw_orders) as f:
            data.draw_orders(f, grid, orders)
        print(f"wrote {args.draw_orders}: {', '.join(orders)} on {grid[0]} x {grid[1]} patches")
        return {"out": args.draw_orders}
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the loop's own handlers (signals_to_flag) took Ctrl-C
        print(STOPPED, file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
