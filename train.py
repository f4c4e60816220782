"""Train a ViT with REOrder's curriculum: the loop, checkpoints, the command line.

    python train.py --order hilbert --learn-order                       # CIFAR-10 under ./data
    python train.py --data fashion-mnist --order row --learn-order --epochs 10
    torchrun --nproc_per_node=8 train.py --data imagenet --root /data/imagenet --model base \\
        --img-size 224 --patch 16 --window 7 --epochs 100 --learn-order --order hilbert
    python train.py --draw-orders orders.png --img-size 224 --patch 16   # a picture of the orders

The curriculum (epochs): [0, policy_start) train on the fixed initial order; [policy_start,
policy_start + policy_epochs) sample orders from the Plackett-Luce policy and update model and
policy together while tau rises and falls 0 -> tau_max -> 0 per step; afterwards freeze the order at
the policy's mode (argsort of its logits) and fine-tune. Validation uses the mode whenever a policy
exists.
"""
import argparse
import dataclasses
import fcntl
import functools
import io
import itertools
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import prior
import reorder
from data import UsageError

# --------------------------------------------------------------------------------------------------
# The curriculum, in steps
# --------------------------------------------------------------------------------------------------


@dataclass
class Curriculum:
    """REOrder's three phases: steps [0, learn_from) train on the fixed initial order; [learn_from,
    learn_until) learn the order while tau follows reorder.triangle_tau; afterwards the order is
    frozen at the policy's mode and the model fine-tuned. Without a policy every step is "fixed"."""
    learn_from: float = math.inf
    learn_until: float = math.inf
    tau_max: float = 0.0
    fixed_tau: float = 0.0  # > 0: the fixed phase trains on orders sampled around the start

    @classmethod
    def of(cls, args, steps_per_epoch):
        if not args.learn_order:
            return cls()
        start = args.policy_start * steps_per_epoch
        return cls(start, start + args.policy_epochs * steps_per_epoch, args.tau_max,
                   args.fixed_tau)

    def phase(self, step):
        """("fixed" | "learn" | "finetune", tau) of a training step."""
        if step < self.learn_from:
            return "fixed", self.fixed_tau
        if step < self.learn_until:
            steps = self.learn_until - self.learn_from
            return "learn", reorder.triangle_tau(step - self.learn_from, steps, self.tau_max)
        return "finetune", 0.0


# --------------------------------------------------------------------------------------------------
# Input: every check runs before anything is written
# --------------------------------------------------------------------------------------------------

LOCK = "train.lock"
RUN_FILES = ("config.json", "prior.json", "metrics.jsonl", "last.pt", "best.pt", "order.pt",
             "order.png")
# A resumed run refuses a change to any of RESUME_KEYS (it would be another experiment). Flags of
# RESUME_MAY_CHANGE (the knobs to get past a NaN, and where it runs) apply from the resume on, and
# are recorded in metrics.jsonl; the rest (--workers, --save-every, --quiet) change no number.
RESUME_KEYS = ("data", "root", "subset", "val_subset", "img_size", "patch", "model", "dim", "depth",
               "heads", "mixer", "window", "order", "prior_n", "learn_order", "epochs",
               "batch_size", "warmup_epochs", "policy_start", "policy_epochs", "tau_max",
               "fixed_tau", "orders_per_step", "reward", "baseline", "granularity", "seed", "world")
RESUME_MAY_CHANGE = ("lr", "policy_lr", "weight_decay", "clip", "amp", "device", "compile")


@contextmanager
def as_usage_errors(template=None, errors=(ValueError,)):
    """Report `errors` as usage errors, one line, exit 2: reorder.py's ValueErrors (bad sizes,
    names) as they are, or template.format(the error on one line)."""
    try:
        yield
    except errors as e:
        raise UsageError(template.format(data.one_line(e)) if template else str(e)) from None


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}): it "
                         f"cannot be resumed; train into another --out") from None


def lock_run_folder(out, take):
    """The run folder's lock: a file holding the pid of the run that writes there, locked with
    fcntl.flock. The kernel releases the lock when that process ends, even by SIGKILL, so a killed
    run's lock file never blocks --resume. A second run gets one line naming the first's pid.
    take=False only checks, creating nothing; take=True returns the lock file, held until closed."""
    try:
        f = open(os.path.join(out, LOCK), "a+" if take else "r")
    except FileNotFoundError:  # nothing to check
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UsageError(f"{out} is in use by process {pid}, a run writing there: wait for it to "
                         f"end, or choose another --out") from None
    if not take:
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_inputs(args, rank, world, out):
    """(checkpoint or None, train set, val set, model): every flag, the run folder, the data and
    the model's configuration checked, so that bad input is one line and nothing is written."""
    data.check_ranges(args, at_least={"epochs": 1, "batch_size": 1, "prior_n": 1, "subset": 1,
                                      "val_subset": 1, "dim": 1, "depth": 1, "heads": 1,
                                      "policy_epochs": 1, "policy_start": 0, "warmup_epochs": 0,
                                      "workers": 0, "save_every": 0, "orders_per_step": 1,
                                      "fixed_tau": 0, "policy_lr": 0},
                      above_zero=("lr", "clip", "tau_max"))  # clip < 0 flips grads
    with as_usage_errors():
        reorder.grid_size(args.img_size, args.patch)
    if args.fixed_tau and not args.learn_order:
        raise UsageError("--fixed-tau samples orders from the policy: it needs --learn-order")
    if args.learn_order:
        if args.policy_start + args.policy_epochs > args.epochs:
            raise UsageError(f"--policy-start {args.policy_start} + --policy-epochs "
                             f"{args.policy_epochs} exceeds --epochs {args.epochs}")
        if args.orders_per_step > 1 and args.baseline == "ema":
            raise UsageError("--baseline ema is the estimator of --orders-per-step 1; with more "
                             "orders the baseline is leave-one-out over them")
        if args.orders_per_step == 1 and args.baseline == "loo":
            if args.granularity != "image":
                raise UsageError("--baseline loo with --orders-per-step 1 needs --granularity "
                                 "image (one order per image)")
            if args.batch_size < 2:
                raise UsageError("--baseline loo needs --batch-size 2 or more: it compares each "
                                 "image with the others of its batch")
    data.check_writable(out)
    if rank == 0:  # the rank that takes the lock (its own would block the others)
        lock_run_folder(out, take=False)
    last = os.path.join(out, "last.pt")
    ckpt = None
    if args.resume:
        if not os.path.exists(last):
            raise UsageError(f"nothing to resume: {last} does not exist")
        ckpt = load_checkpoint(last)
        saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
        diff = [k for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
        if not isinstance(ckpt, dict) or "model" not in ckpt or diff:
            what = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {getattr(args, k)})"
                             for k in diff[:3])
            raise UsageError(f"checkpoint {last} does not match this run: it was trained with "
                             f"{what or 'another layout'}; use the same flags, or another --out")
    else:  # any output of a run, not only last.pt: nothing of an earlier run is overwritten
        found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
        if found:
            raise UsageError(f"{out} already holds a run ({', '.join(found)}): pass --resume to "
                             f"continue it, or choose another --out")

    train_set = data.build_dataset(args.data, args.root, "train", args.img_size, augment=True,
                                   seed=args.seed, subset=args.subset, patch=args.patch)
    val_set = data.build_dataset(args.data, args.root, "val", args.img_size,
                                 subset=args.val_subset, patch=args.patch)
    if len(train_set) < args.batch_size * world:
        raise UsageError(f"{len(train_set)} training images are fewer than one batch of "
                         f"{args.batch_size} x {world} processes: lower --batch-size")
    classes = [getattr(data.base_dataset(s), "classes", None) for s in (train_set, val_set)]
    if classes[0] != classes[1]:
        raise UsageError(f"train/ and val/ hold different class folders under {args.root}: "
                         f"make them match")
    firsts = [next(data.readable_items(dataset), None) for dataset in (train_set, val_set)]
    for split, first in zip(("train", "val"), firsts):
        if first is None:
            raise UsageError(f"no readable image in the {split} split of --data {args.data} "
                             f"(each one is named above)")
    sizes = {k: getattr(args, k) for k in ("dim", "depth", "heads") if getattr(args, k) is not None}
    with as_usage_errors():  # reorder.py's own checks (window, width vs heads, ...)
        cfg = reorder.vit_config(args.model, img_size=args.img_size, patch_size=args.patch,
                                 in_chans=firsts[0][0].shape[0],
                                 num_classes=data.num_classes_of(train_set),
                                 mixer=args.mixer, window=args.window, **sizes)
        model = reorder.ViT(cfg)
    return ckpt, train_set, val_set, model


def initial_order(args, grid, train_set, rank, world):
    """(perm, name, prior table or None): the order training starts from, given as a name, "prior"
    (prior.py's pick on a training sample, measured on rank 0), or a saved order's path."""
    n = grid[0] * grid[1]
    if args.order in reorder.ORDERS + ("random",):
        return reorder.order(args.order, *grid, seed=args.seed), args.order, None
    if args.order != "prior":
        return data.load_order(args.order, n), args.order, None
    pick, table = [None], None
    if rank == 0:
        images = prior.sample_images(train_set.dataset, args.prior_n, args.seed)  # unflipped
        table = prior.compressibility(images, args.patch, seed=args.seed, progress=not args.quiet)
        print(prior.format_table(table))
        pick[0] = prior.pick(table)
    if world > 1:
        dist.broadcast_object_list(pick, src=0)
    if pick[0] is None:
        raise UsageError("--order prior: a tie, no one ordering is the least compressible on "
                         "these images, so the prior picks none: give --order yourself")
    if rank == 0:
        print(f"--order prior: starting from {pick[0]}, the least compressible ordering")
    return reorder.order(pick[0], *grid), f"prior:{pick[0]}", table


# --------------------------------------------------------------------------------------------------
# Devices and loaders
# --------------------------------------------------------------------------------------------------

def setup_distributed(device_flag):
    """(rank, world, device): torchrun's environment if present, else one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device here: use --device cpu "
                         "(or auto)")
    if world == 1:
        return 0, 1, torch.device(device_flag)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_flag == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device_flag == "cuda" else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if device_flag == "cuda" else "cpu")


def amp_dtype(flag, device):
    """The autocast dtype: none on CPU or with --amp off; bf16 where the GPU has it, else fp16."""
    if device.type != "cuda" or flag == "off":
        return None
    if flag == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, a shard per rank) that can start part-way."""

    def __init__(self, dataset, world, rank, shuffle, seed):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=shuffle)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def make_loaders(args, train_set, val_set, rank, world, device):
    """(train sampler, train loader, val loader): a shard per rank, workers only for folders."""
    workers = args.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if args.data in ("imagenet", "fmow", "folder") else 0
    common = dict(num_workers=workers, pin_memory=device.type == "cuda",
                  collate_fn=data.collate_skipping_none)
    sampler = ResumableSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_set, args.batch_size,
                            sampler=ResumableSampler(val_set, world, rank, False, 0), **common)
    return sampler, loader, val_loader


# --------------------------------------------------------------------------------------------------
# One step of the classifier, one step of the policy, validation
# --------------------------------------------------------------------------------------------------

def model_step(model, optimizer, scheduler, scaler, images, labels, perms, dtype, clip):
    """One training step of the classifier on images read in order perms[0] ([N] or [B, N]):
    forward under autocast, per-image cross-entropy, backward, clip, AdamW, lr schedule. The
    other orders perms[1:] are only scored, on the same images with the same weights, before the
    step. Returns (logits [K, B, classes], per-image loss [K, B], loss value), detached; a
    non-finite loss returns before the weights are touched."""
    with autocast(images.device, dtype):
        logits = [model(images, perms[0])]
    per_image = F.cross_entropy(logits[0].float(), labels, reduction="none")
    loss = per_image.mean()
    with torch.no_grad(), autocast(images.device, dtype):
        logits += [model(images, perm) for perm in perms[1:]]
    logits = torch.stack([x.detach().float() for x in logits])
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(logits)),
                             reduction="none").view(len(logits), -1)
    loss_value = loss.item()  # read before the backward pass: a NaN never touches the weights
    if math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                       clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return logits, losses, loss_value


def sample_orders(policy, k, tau, generator, images=None):
    """K orders from the policy at temperature tau (Gumbel-top-k): one for the batch [K, N], or
    one per image [K, images, N]."""
    perms = policy.sample(k * (images or 1), tau, generator)[0]
    return perms.view(k, -1) if images is None else perms.view(k, images, -1)


def policy_optimizer(policy, lr):
    """SGD, not the paper's AdamW. Adam scales every step to about lr whatever the gradient's
    size, so rewards that cannot tell orders apart (a model that does not yet use the order, or
    float noise) would still move the logits at full speed; SGD's step is proportional to the
    reward differences it saw, so no signal means no step (README: what the policy needs)."""
    return torch.optim.SGD(policy.parameters(), lr=lr)


def policy_update(policy, policy_opt, perm, tau, reward, baseline, world=1):
    """One REINFORCE step of the policy (§5) on the orders `perm` and their rewards: scored under
    the current logits (on every rank: the orders are rank 0's), gradients averaged over ranks,
    clipped to 5, one optimizer step. Returns log p(perm), detached."""
    log_prob = policy.log_prob(perm, tau)
    policy_opt.zero_grad(set_to_none=True)
    reorder.reinforce_loss(log_prob, reward, baseline).backward()
    if world > 1:
        dist.all_reduce(policy.logits.grad)
        policy.logits.grad /= world
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 5.0)
    policy_opt.step()
    return log_prob.detach()


def evaluate(model, loader, perm, device, dtype, world):
    """(top-1 %, top-5 %) with one order for all images, summed over ranks. (Under DDP the sampler
    pads the last shard with up to world - 1 repeated images, as DistributedSampler does.)"""
    model.eval()
    totals = torch.zeros(3, device=device)  # top-1 correct, top-5 correct, images
    with torch.no_grad():
        for batch in loader:
            if batch is None:  # every image of it was unreadable (each one warned)
                continue
            x, y = (t.to(device, non_blocking=True) for t in batch)
            with autocast(device, dtype):
                logits = model(x, perm)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                                   torch.tensor(len(y), device=device)]).float()
    if world > 1:
        dist.all_reduce(totals)
    model.train()
    return (100 * totals[0] / totals[2]).item(), (100 * totals[1] / totals[2]).item()


# --------------------------------------------------------------------------------------------------
# What a checkpoint holds besides modules and optimizers
# --------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where the run is: epoch, steps done in it, one history line per epoch, the running sums
    of the epoch under way, and the flags a --resume changed in it ({flag: [before, after]})."""
    epoch: int = 0
    done_in_epoch: int = 0
    history: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)
    changed: dict = field(default_factory=dict)

    def add(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        self.__init__(**state)


class RandomStreams:
    """The random streams a resumed run continues: torch's global CPU and CUDA generators and the
    policy's sampling generator (a CPU one; data order and flips are functions of seed, epoch and
    index, not of these)."""

    def __init__(self, device, policy_gen):
        self.device, self.policy_gen = device, policy_gen

    def state_dict(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda, "policy": self.policy_gen.get_state()}

    def load_state_dict(self, state):
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"], self.device)
        self.policy_gen.set_state(state["policy"])


# --------------------------------------------------------------------------------------------------
# Pictures of orders
# --------------------------------------------------------------------------------------------------

VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                       dtype=torch.float)


def order_image(perm, grid, cell):
    """uint8 [3, h*cell, w*cell]: each patch coloured by its slot (dark = early), the path drawn
    through the patch centres in white, the first patch marked red."""
    from torchvision.utils import draw_keypoints
    h, w = grid
    slot = perm.argsort().float() / max(h * w - 1, 1)  # each patch's slot, 0 = first, 1 = last
    x = slot * (len(VIRIDIS) - 1)
    lo = x.floor().long().clamp(max=len(VIRIDIS) - 2)
    colours = VIRIDIS[lo] + (x - lo)[:, None] * (VIRIDIS[lo + 1] - VIRIDIS[lo])  # [N, 3]
    image = colours.T.reshape(3, h, w).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    centres = torch.stack([(perm % w).float(), (perm // w).float()], 1) * cell + cell / 2  # by slot
    image = draw_keypoints(image.to(torch.uint8), centres[None],
                           connectivity=[(k, k + 1) for k in range(h * w - 1)], colors="white",
                           radius=max(1, cell // 8), width=max(1, cell // 10))
    return draw_keypoints(image, centres[None, :1], colors="red", radius=max(2, cell // 4))


def draw_order(perm, grid, path):
    """order.png of a run: order_image at about 512 pixels."""
    from torchvision.transforms.functional import to_pil_image
    to_pil_image(order_image(perm, grid, max(8, 512 // max(grid)))).save(path, format="PNG")


def draw_orders(path, grid, orders, columns=4):
    """One PNG of several orders ({title: perm}) side by side, each titled, in order.png's style."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image
    cell = max(6, 224 // max(grid))
    panels = [(title, to_pil_image(order_image(perm, grid, cell)))
              for title, perm in orders.items()]
    pw, ph = panels[0][1].size
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * (pw + 12) + 12, rows * (ph + 30) + 12), "white")
    pen = ImageDraw.Draw(sheet)
    for k, (title, panel) in enumerate(panels):
        x, y = 12 + (k % columns) * (pw + 12), 12 + (k // columns) * (ph + 30)
        pen.text((x, y), title, fill="black")
        sheet.paste(panel, (x, y + 16))
    sheet.save(path, format="PNG", optimize=True)


# --------------------------------------------------------------------------------------------------
# Resuming, the run folder, its files, and the epoch's record
# --------------------------------------------------------------------------------------------------

def resume(state, ckpt, args, rank, schedule):
    """Load every stateful object from the checkpoint; flags of RESUME_MAY_CHANGE apply from here
    on (--clip, --amp, --device, --compile are read from args anyway) and are returned as
    {flag: [before, after]} for metrics.jsonl."""
    for name, obj in state.items():
        if name != "scaler" or ckpt[name]:  # a run without fp16 saved no scaler: start a fresh one
            obj.load_state_dict(ckpt[name])
    optimizer, scheduler = state["optimizer"], state["scheduler"]
    policy_opt = state.get("policy_opt")
    scheduler.base_lrs = [args.lr]
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = args.lr * schedule(scheduler.last_epoch), args.weight_decay
    for g in policy_opt.param_groups if policy_opt else ():
        g["lr"] = args.policy_lr
    changed = {k: [ckpt["config"].get(k), getattr(args, k)] for k in RESUME_MAY_CHANGE
               if ckpt["config"].get(k) != getattr(args, k)}
    if changed and rank == 0:
        print("--resume with " + ", ".join(f"--{k.replace('_', '-')} {new} (was {old})"
                                           for k, (old, new) in changed.items())
              + ": applied from here on, and recorded in metrics.jsonl")
    return changed


@contextmanager
def run_folder(out, rank):
    """The run folder, made and locked by rank 0, with the temporary files of writes killed
    mid-way removed; unlocked at the end, and removed if this run made it and could write
    nothing into it (a full disk)."""
    if rank != 0:
        yield
        return
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    lock = lock_run_folder(out, take=True)
    data.remove_temporary_files(out)  # no one else writes here now
    try:
        yield
    finally:
        os.remove(lock.name)
        lock.close()
        if created:
            with suppress(OSError):  # not empty
                os.rmdir(out)


class Checkpoints:
    """The run's files: last.pt, and at an epoch's end best.pt, metrics.jsonl, order.pt and
    order.png. last.pt only ever holds a state that has given a finite loss: a checkpoint is held
    back, serialized, until the next step's loss is finite, and only then written (committed)."""

    def __init__(self, out, rank, state, meta, grid, resumed):
        self.out, self.rank, self.state, self.meta, self.grid = out, rank, state, meta, grid
        self.last = os.path.join(out, "last.pt")
        self.progress = state["progress"]
        self.saved = self.where() if resumed else None  # (epoch, step) that last.pt holds
        self.pending = None  # (bytes, where, the order if at an epoch's end)

    def where(self):
        return self.progress.epoch, self.progress.done_in_epoch

    def hold(self, order_now=None):
        """Serialize the state now as the pending checkpoint (one still pending is committed
        first: no step has changed the weights since it was taken)."""
        self.commit()
        buffer = io.BytesIO()
        if self.rank == 0:
            torch.save({**{k: obj.state_dict() for k, obj in self.state.items()}, **self.meta},
                       buffer)
        self.pending = buffer.getvalue(), self.where(), order_now

    def commit(self):
        """Write the pending checkpoint as last.pt, then, at an epoch's end, its outputs."""
        if self.pending:
            blob, where, order_now = self.pending
            if self.rank == 0:
                data.atomic_write(blob, self.last)
                if order_now is not None:
                    self.write_outputs(blob, order_now)
            self.pending, self.saved = None, where

    def write_outputs(self, blob, order_now):
        """best.pt (if this epoch is the best so far), metrics.jsonl, order.pt and order.png of
        the epoch whose end the checkpoint `blob` holds."""
        history = self.progress.history
        tops = [line["val_top1"] for line in history]
        if tops.index(max(tops)) == len(tops) - 1:
            data.atomic_write(blob, os.path.join(self.out, "best.pt"))
        with data.atomic_path(os.path.join(self.out, "metrics.jsonl")) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in history)
        data.save_order(os.path.join(self.out, "order.pt"), order_now, self.grid)
        with data.atomic_path(os.path.join(self.out, "order.png")) as tmp:
            draw_order(order_now.cpu(), self.grid, tmp)

    def repair(self, order_now):
        """On --resume at an epoch's end: a kill may have come between last.pt and the outputs."""
        if self.rank == 0 and self.progress.history and not self.progress.done_in_epoch:
            with open(self.last, "rb") as f:
                self.write_outputs(f.read(), order_now)

    def nan_stop(self, loss_value, step, steps_per_epoch):
        """The one-line stop for a non-finite loss (the pending checkpoint gave it: dropped)."""
        good = self.saved if self.saved != self.where() else None
        return UsageError(
            f"loss is {loss_value} at step {step} (epoch {self.progress.epoch}): stopped; "
            + (f"{self.last} holds epoch {good[0]} after {good[1]} of {steps_per_epoch} steps, "
               f"the last state known to give a finite loss: --resume with a lower --lr (or "
               f"--amp bf16/off)" if good else "no checkpoint holds a state known to give a "
               "finite loss: start again with a lower --lr in another --out"))

    @contextmanager
    def on_interrupt(self, steps_per_epoch):
        """Ctrl-C: commit the last finished step's state (whole, and cheap), and say in one line
        where --resume continues."""
        try:
            yield
        except KeyboardInterrupt:
            self.commit()
            epoch, step = self.saved or (0, 0)
            raise KeyboardInterrupt(
                f"--resume continues from epoch {epoch} after {step} of {steps_per_epoch} steps "
                f"({self.last})" if self.saved else "before the first checkpoint: nothing to "
                "resume; start again in another --out") from None


def epoch_record(progress, curriculum, steps_per_epoch, top1, top5, lr, order_now, start_perm,
                 device, world, seconds):
    """The epoch's line of metrics.jsonl, from the running sums (train loss and top-1 over every
    rank's images)."""
    s, p_steps = progress.sums, progress.sums.get("policy_steps", 0)
    totals = torch.tensor([s["loss"], s["correct"], s["images"]], dtype=torch.float64,
                          device=device)
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, images = totals.tolist()

    def per_step(key):
        return s[key] / p_steps if p_steps else None
    return {
        "epoch": progress.epoch, "phase": curriculum.phase(progress.epoch * steps_per_epoch)[0],
        "train_loss": loss_sum / images, "train_top1": 100 * correct / images,
        "val_top1": top1, "val_top5": top5, "lr": lr, "tau": s["tau"] / s["steps"],
        "reward": per_step("reward"),
        "entropy": per_step("neg_logp"),  # Monte Carlo, at the tau used
        # order sensitivity: how far apart the K orders' rewards on the same images are, against
        # how far apart the rewards of different batches are (what an EMA baseline leaves)
        "order_spread": per_step("spread"),
        "batch_noise": math.sqrt(max(0.0, per_step("reward_sq") - per_step("reward") ** 2))
        if p_steps else None,
        # mean number of slots a patch has moved since the start; argsort(perm) = each slot
        "order_shift": (order_now.argsort() - start_perm.argsort()).abs().float().mean().item(),
        "changed": progress.changed, "seconds": seconds}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def train(args):
    """Run (or resume) training; returns a summary dict (final metrics, order, policy logits)."""
    rank, world, device = setup_distributed(args.device)
    args.world = world
    torch.manual_seed(args.seed)
    mixer = "" if args.mixer == "window" else f"-{args.mixer}"
    out = args.out or os.path.join("runs", f"{args.data}-{args.order.replace(os.sep, '_')}{mixer}"
                                           f"{'-learn' if args.learn_order else ''}-s{args.seed}")
    # a hand-edited checkpoint: a key missing, a shape changed (read here and where it is loaded)
    ckpt_errors = functools.partial(
        as_usage_errors, f"checkpoint {os.path.join(out, 'last.pt')} does not fit this run ({{}}):"
                         f" it cannot be resumed; train into another --out",
        (KeyError, TypeError, ValueError, RuntimeError, IndexError))
    ckpt, train_set, val_set, raw_model = check_inputs(args, rank, world, out)
    raw_model, grid = raw_model.to(device), raw_model.grid
    if ckpt:
        with ckpt_errors():
            start_perm = reorder.check_perm(ckpt["start_perm"], grid[0] * grid[1])
            order_name, prior_table = ckpt["order_name"], None
    else:
        start_perm, order_name, prior_table = initial_order(args, grid, train_set, rank, world)
    start_perm = start_perm.to(device)

    # ---- model, policy, optimizers, schedules; everything a checkpoint restores in one dict
    sampler, loader, val_loader = make_loaders(args, train_set, val_set, rank, world, device)
    steps_per_epoch = len(sampler) // args.batch_size
    curriculum = Curriculum.of(args, steps_per_epoch)
    dtype = amp_dtype(args.amp, device)
    model = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr,
                                  weight_decay=args.weight_decay)
    schedule = functools.partial(lr_factor, warmup_steps=args.warmup_epochs * steps_per_epoch,
                                 total_steps=args.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    policy = policy_opt = None
    if args.learn_order:
        policy = reorder.PlackettLuce.from_order(start_perm.cpu()).to(device)  # fp32 under AMP
        policy_opt = policy_optimizer(policy, args.policy_lr)
    ema = reorder.EMABaseline(0.99)
    policy_gen = torch.Generator().manual_seed(args.seed + 1)  # CPU: the same orders anywhere
    progress = Progress()
    state = {"model": raw_model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
             "policy": policy, "policy_opt": policy_opt, "baseline": ema,
             "rng": RandomStreams(device, policy_gen), "progress": progress}
    state = {name: obj for name, obj in state.items() if obj is not None}
    meta = {"start_perm": start_perm.cpu(), "order_name": order_name,
            "config": {k: getattr(args, k) for k in RESUME_KEYS + RESUME_MAY_CHANGE}}
    if ckpt:
        with ckpt_errors():
            changed = resume(state, ckpt, args, rank, schedule)  # (it replaces progress.changed)
        progress.changed.update(changed)
    checkpoints = Checkpoints(out, rank, state, meta, grid, resumed=ckpt is not None)

    def current_order():
        return policy.mode() if policy is not None else start_perm

    with run_folder(out, rank), checkpoints.on_interrupt(steps_per_epoch):
        # all input checked: from here on the run writes into `out`
        if ckpt:
            checkpoints.repair(current_order())
            if progress.epoch >= args.epochs:
                print(f"{out}: the run is complete ({args.epochs} epochs); its outputs match "
                      f"{checkpoints.last}")
        elif rank == 0:
            for name, content in (("config.json", {**vars(args), "order_name": order_name,
                                                   "vit": dataclasses.asdict(raw_model.cfg),
                                                   "steps_per_epoch": steps_per_epoch}),
                                  ("prior.json", prior_table)):
                if content:
                    with data.atomic_path(os.path.join(out, name)) as tmp, open(tmp, "w") as f:
                        json.dump(content, f, indent=1)

        # ---- the loop
        while progress.epoch < args.epochs:
            t0 = time.time()
            sampler.set_epoch(progress.epoch)
            sampler.skip = progress.done_in_epoch * args.batch_size
            loader.dataset.epoch = progress.epoch
            bar = tqdm(loader, desc=f"epoch {progress.epoch}", total=steps_per_epoch,
                       initial=progress.done_in_epoch, disable=rank != 0 or args.quiet,
                       leave=False)
            for batch in bar:
                step = progress.epoch * steps_per_epoch + progress.done_in_epoch
                if batch is None:  # every image of it was unreadable (each one warned)
                    progress.done_in_epoch += 1
                    continue
                x, y = (t.to(device, non_blocking=True) for t in batch)
                phase, tau = curriculum.phase(step)

                # 1. the orders: while learning, K samples from the policy (rank 0's, on every
                #    rank), each one for the batch [K, N] or one per image [K, B, N]; before,
                #    the start order (or samples around it at --fixed-tau); after, the mode
                if tau > 0:
                    k = args.orders_per_step if phase == "learn" else 1
                    perms = sample_orders(policy, k, tau, policy_gen,
                                          None if args.granularity == "batch" else len(y))
                    if world > 1:
                        dist.broadcast(perms, 0)
                else:
                    perms = current_order()[None]

                # 2. the classifier's step on the first order; the others only scored, on the
                #    same images with the same weights
                logits, losses, loss_value = model_step(model, optimizer, scheduler, scaler, x, y,
                                                        perms, dtype, args.clip)
                if not math.isfinite(loss_value):
                    raise checkpoints.nan_stop(loss_value, step, steps_per_epoch)
                checkpoints.commit()  # the held-back state gave a finite loss
                correct = logits[0].argmax(1) == y

                # 3. REINFORCE (§5): a reward per order (and image), its baseline, a policy step
                if phase == "learn":
                    reward = -losses if args.reward == "xent" else (logits.argmax(-1) == y) * 2. - 1
                    if args.granularity == "batch":  # one order, one reward: [K, B] -> [K]
                        reward = reward.mean(1)
                        if world > 1:
                            dist.all_reduce(reward)
                            reward /= world
                    if len(perms) > 1:  # leave-one-out over the orders: image noise cancels
                        baseline = reorder.loo_baseline(reward, dim=0)
                    elif args.baseline == "ema":  # the paper's estimator
                        baseline = ema(reward.mean().item())
                    else:  # one order per image, leave-one-out over the images
                        baseline = reorder.loo_baseline(reward, dim=1)
                    log_prob = policy_update(policy, policy_opt, perms, tau, reward, baseline,
                                             world)
                    per_order = (reward.mean(-1) if reward.dim() > 1 else reward).tolist()
                    progress.add(reward=per_order[0], reward_sq=per_order[0] ** 2,
                                 spread=torch.tensor(per_order).std().item() if k > 1 else 0.0,
                                 neg_logp=-log_prob.mean().item(), policy_steps=1)

                # 4. bookkeeping, and a checkpoint every --save-every steps
                progress.add(loss=loss_value * len(y), correct=correct.sum().item(),
                             images=len(y), tau=tau, steps=1)
                progress.done_in_epoch += 1
                s, p_steps = progress.sums, max(1, progress.sums.get("policy_steps", 0))
                bar.set_postfix(loss=f"{loss_value:.3f}", tau=f"{tau:.3f}",
                                acc=f"{100 * s['correct'] / s['images']:.1f}",
                                reward=f"{s.get('reward', 0) / p_steps:.3f}",
                                spread=f"{s.get('spread', 0) / p_steps:.1e}")
                if args.save_every and progress.done_in_epoch % args.save_every == 0 \
                        and progress.done_in_epoch < steps_per_epoch:
                    checkpoints.hold()
            bar.close()

            # ---- end of epoch: validate, log, hold the checkpoint until the next step's loss
            order_now = current_order()
            top1, top5 = evaluate(model, val_loader, order_now, device, dtype, world)
            progress.history.append(epoch_record(progress, curriculum, steps_per_epoch, top1,
                                                 top5, scheduler.get_last_lr()[0], order_now,
                                                 start_perm, device, world, time.time() - t0))
            progress.epoch, progress.done_in_epoch = progress.epoch + 1, 0
            progress.sums, progress.changed = {}, {}
            checkpoints.hold(order_now)
            if rank == 0:
                h = progress.history[-1]
                print(f"epoch {h['epoch']} {h['phase']}: train loss {h['train_loss']:.4f}, val "
                      f"top-1 {top1:.2f} top-5 {top5:.2f}, tau {h['tau']:.3f}, order shift "
                      f"{h['order_shift']:.2f}, {h['seconds']:.1f} s", flush=True)
        checkpoints.commit()  # the last epoch's end: no later step to wait for

    return {"out": out, "history": progress.history, "order": current_order().cpu(),
            "policy_logits": policy.logits.detach().cpu() if policy is not None else None}


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up, then cosine down to 1% of the base rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def window_arg(text):
    """--window: an integer >= 0 (slots; 0 = each token sees itself and CLS), or none = no limit."""
    if text.lower() in ("none", "auto"):
        return text.lower()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def parse_args(argv=None):
    ap = data.OneLineParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument_group("data").add_argument
    a("--data", default="cifar10", choices=data.DATASETS,
      help="pairs, neighbours: the known-answer tasks (data.PairImages)")
    a("--root", default=None,
      help="data folder (cifar10: ./data; fashion-mnist: Debian's package folder, else ./data)")
    a("--subset", type=int, default=None, help="train on a fixed random subset of K images")
    a("--val-subset", type=int, default=None, help="validate on a fixed random subset of K images")
    a("--workers", type=int, default=None,
      help="loader processes (default: 0 in memory, min(8, cores) for folders)")
    a = ap.add_argument_group("model and order").add_argument
    a("--model", default="tiny", choices=sorted(reorder.PRESETS))
    a("--dim", type=int, default=None, help="override the preset's width")
    a("--depth", type=int, default=None, help="override the preset's depth")
    a("--heads", type=int, default=None, help="override the preset's heads")
    a("--img-size", type=int, default=32)
    a("--patch", type=int, default=4)
    a("--mixer", default="window", choices=reorder.MIXERS,
      help="token mixer: window (Longformer, default), causal (Transformer-XL), mamba (a scan)")
    a("--window", type=window_arg, default="auto",
      help="window: attention reaches ±window slots (default 7, the paper's; none = full "
           "attention); causal: the window earlier slots (default none: all); mamba: not allowed")
    a("--order", default="row", help=f"initial order: {', '.join(reorder.ORDERS)}, random, prior "
                                     f"(prior.py's pick on a training sample), or a saved order.pt")
    a("--prior-n", type=int, default=512, help="images sampled for --order prior")
    a = ap.add_argument_group("REOrder curriculum (defaults: the paper's 15/30/0.2 of 100 epochs, "
                              "scaled to --epochs)").add_argument
    a("--learn-order", action="store_true", help="learn the order with the Plackett-Luce policy")
    a("--policy-start", type=int, default=None,
      help="epochs on the fixed order first (default 15%% of --epochs)")
    a("--policy-epochs", type=int, default=None,
      help="epochs of order learning (default 30%% of --epochs)")
    a("--tau-max", type=float, default=0.2, help="peak of the triangular temperature")
    a("--fixed-tau", type=float, default=0.0,
      help="> 0: before learning, train on orders sampled around the start at this temperature "
           "(100: random orders), so that the model learns to read other orders than its start")
    a("--orders-per-step", type=int, default=4,
      help="K orders scored on the same images each learning step (1: the paper's estimator)")
    a("--policy-lr", type=float, default=0.01,
      help="the policy's SGD learning rate (0: a frozen policy, a control); see README")
    a("--reward", default="xent", choices=["xent", "binary"], help="-cross-entropy, or ±1")
    a("--baseline", default=None, choices=["ema", "loo"],
      help="leave-one-out over the K orders (K > 1); with K = 1 the paper's EMA (0.99), or "
           "leave-one-out over the images (--granularity image)")
    a("--granularity", default="batch", choices=["batch", "image"],
      help="one order per batch or per image")
    a = ap.add_argument_group("training").add_argument
    a("--epochs", type=int, default=100)
    a("--batch-size", type=int, default=128, help="per process")
    a("--lr", type=float, default=1e-4)
    a("--weight-decay", type=float, default=0.03)
    a("--warmup-epochs", type=int, default=None, help="default 5%% of --epochs (paper: 5 of 100)")
    a("--clip", type=float, default=5.0)
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
      help="CUDA only: bf16 where supported, else fp16")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a("--seed", type=int, default=0)
    a = ap.add_argument_group("output").add_argument
    a("--out", default=None,
      help="run folder (default runs/<data>-<order>[-<mixer>][-learn]-s<seed>)")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--save-every", type=int, default=500,
      help="also checkpoint every N steps within an epoch (0 = off)")
    a("--quiet", action="store_true", help="no progress bars")
    a("--draw-orders", metavar="PNG", default=None,
      help="only draw the six orderings, random, and --order if it is a saved order.pt, on the "
           "grid of --img-size / --patch, into one PNG, then exit")
    args = ap.parse_args(argv)
    if args.baseline is None:
        args.baseline = "ema" if args.orders_per_step == 1 else "loo"
    if args.mixer == "mamba" and args.window != "auto":
        ap.error("--window does not apply to --mixer mamba (a scan reads the whole sequence)")
    if args.window == "auto":
        args.window = 7 if args.mixer == "window" else None
    elif args.window == "none":
        args.window = None
    e = args.epochs
    if args.policy_start is None:
        args.policy_start = max(1, round(0.15 * e)) if e >= 3 else 0
    if args.policy_epochs is None:
        room = e - args.policy_start - (1 if e >= 3 else 0)  # leave a fine-tuning epoch
        args.policy_epochs = max(1, min(round(0.30 * e), room))
    if args.warmup_epochs is None:
        args.warmup_epochs = round(0.05 * e)
    return args


def draw_orders_main(args):
    """--draw-orders: the orderings on the grid of --img-size / --patch, as one PNG."""
    with as_usage_errors():
        grid = reorder.grid_size(args.img_size, args.patch)
    orders = {name: reorder.order(name, *grid, seed=args.seed) for name in reorder.ORDERS}
    orders[f"random (seed {args.seed})"] = reorder.order("random", *grid, seed=args.seed)
    if os.path.isfile(args.order):
        orders[os.path.basename(os.path.dirname(os.path.abspath(args.order))) or args.order] = \
            data.load_order(args.order, grid[0] * grid[1])
    draw_orders(args.draw_orders, grid, orders)
    print(f"wrote {args.draw_orders}: {', '.join(orders)} on {grid[0]} x {grid[1]} patches")
    return {"out": args.draw_orders}


def main(argv=None):
    args = parse_args(argv)
    try:
        return draw_orders_main(args) if args.draw_orders else train(args)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C; train() says where --resume continues
        print(f"train.py: interrupted{': ' if str(e) else ''}{e}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
