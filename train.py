"""Train a windowed-attention ViT with REOrder's curriculum: data, schedules, the loop, checkpoints, CLI.

    python train.py --order hilbert --learn-order                       # CIFAR-10 under ./data
    python train.py --data fashion-mnist --order row --learn-order --epochs 10
    torchrun --nproc_per_node=8 train.py --data imagenet --root /data/imagenet --model base \\
        --img-size 224 --patch 16 --window 7 --epochs 100 --learn-order --order hilbert

The curriculum (epochs): [0, policy_start) train on the fixed initial order; [policy_start,
policy_start + policy_epochs) sample orders from the Plackett-Luce policy and update model and policy
together while tau rises and falls 0 -> tau_max -> 0 per step; afterwards freeze the order at the
policy's mode (argsort of its logits) and fine-tune. Validation uses the mode whenever a policy exists.
"""
import argparse
import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import os
import pickle
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import reorder

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "fashion-mnist": ((0.2860,), (0.3530,)),
            "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # ImageNet's, also for fMoW


class UsageError(ValueError):
    """Bad input: reported as one line, exit status 2, nothing overwritten."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with errors on one line (exit status 2) instead of usage text plus the error."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------------
# Data. Every dataset yields (float image [C, H, W], normalized; int label). The only random
# augmentation, the paper's horizontal flip, is a pure function of (seed, epoch, index), so a resumed
# run sees exactly the images it would have seen, whatever the number of loader workers.
# --------------------------------------------------------------------------------------------------

class TensorImages(Dataset):
    """Images held in memory as uint8 [n, C, h, w]: scaled, padded/resized to `size`, normalized."""

    def __init__(self, images, labels, size, mean, std, pad_to=None, num_classes=10):
        self.images, self.labels, self.size, self.pad_to = images, labels, size, pad_to
        self.num_classes = num_classes
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255
        if self.pad_to:  # Fashion-MNIST: 28 -> 32, the usual padding
            p = (self.pad_to - x.shape[-1]) // 2
            x = F.pad(x, (p, p, p, p))
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return (x - self.mean) / self.std, int(self.labels[i])


class SyntheticImages(Dataset):
    """Class templates plus noise, generated from the index alone: a dataset for tests and smoke runs."""

    def __init__(self, n, size, num_classes=10, offset=0):
        self.n, self.size, self.num_classes, self.offset = n, size, num_classes, offset
        g = torch.Generator().manual_seed(1234)
        self.templates = torch.randn(num_classes, 3, size, size, generator=g)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.offset + i)
        label = int(torch.randint(self.num_classes, (), generator=g))
        return self.templates[label] * 0.5 + torch.randn(3, self.size, self.size, generator=g), label


class PairImages(Dataset):
    """The known-answer task for orderings: patch (r, c) is paired with (r + h/2, c); each patch
    shows one bit (plus noise). Label 0: the bottom half repeats the top half, so every pair matches.
    Label 1: `mismatches` random pairs differ (default: half of them). Row-major puts every pair
    h/2 · w slots apart, beyond a small window; `pair_order` puts them side by side. Each half's
    patches alone are uniformly random, so chance is 50%. Generated from the index alone; a
    horizontal flip keeps the label."""

    num_classes = 2

    def __init__(self, n, size, patch, offset=0, mismatches=None, noise=0.5):
        h, w = reorder.grid_size(size, patch)
        if h % 2:
            raise UsageError(f"--data pairs needs an even number of patch rows, got {h} "
                             f"(--img-size {size} / --patch {patch}): e.g. --img-size 32 --patch 4")
        self.n, self.patch, self.grid, self.offset = n, patch, (h, w), offset
        self.mismatches, self.noise = mismatches or h // 2 * w // 2, noise

    def __len__(self):
        return self.n

    def bits(self, i):
        """(bits [h, w] of image i, label, the generator that drew them)."""
        (h, w), g = self.grid, torch.Generator().manual_seed(self.offset + i)
        top = torch.randint(2, (h // 2 * w,), generator=g)
        label = int(torch.randint(2, (), generator=g))
        bottom = top.clone()
        if label:
            bottom[torch.randperm(len(top), generator=g)[:self.mismatches]] ^= 1
        return torch.cat([top, bottom]).view(h, w), label, g

    def __getitem__(self, i):
        bits, label, g = self.bits(i)
        # a bit is the patch's upper half bright (0) or dark (1), not its mean, which the patch
        # embedding's LayerNorm removes; both patterns are their own horizontal mirror images
        p = self.patch
        edge = torch.where(torch.arange(p) < p // 2, 1.0, -1.0)[:, None].expand(p, p)
        image = (edge * (1 - 2 * bits.float())[:, :, None, None]).permute(0, 2, 1, 3).reshape(bits.shape[0] * p, -1)
        return (image + self.noise * torch.randn(image.shape, generator=g))[None], label


def pair_order(h, w):
    """The order that puts patch (r, c) right before its partner (r + h/2, c): [h*w] (PairImages)."""
    top = torch.arange(h // 2 * w)
    return torch.stack([top, top + h // 2 * w], 1).flatten()


def pair_distance(perm, h, w):
    """Mean number of slots between the two patches of a PairImages pair in the sequence `perm`."""
    slots = perm.argsort()[pair_order(h, w).view(-1, 2)]  # [pairs, 2]: where each partner sits
    return (slots[:, 0] - slots[:, 1]).abs().float().mean().item()


class SafeImageFolder(Dataset):
    """torchvision's ImageFolder that skips an unreadable image with a one-line warning (and returns None)."""

    def __init__(self, root, transform):
        from torchvision.datasets import ImageFolder
        try:
            self.folder = ImageFolder(root, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"no images in {root}: expected {root}/<class>/<image>.jpg ({e})") from None
        self.classes = self.folder.classes

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            return self.folder[i]
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            print(f"warning: skipping unreadable image {self.folder.samples[i][0]} ({type(e).__name__})",
                  file=sys.stderr)
            return None


def collate_skipping_none(batch):
    return torch.utils.data.default_collate([item for item in batch if item is not None])


class Flipped(Dataset):
    """Horizontal flip with probability 1/2, decided by hashing (seed, epoch, index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        key = f"{self.seed}:{self.epoch}:{i}".encode()
        if item is None or hashlib.blake2b(key, digest_size=1).digest()[0] < 128:
            return item
        return item[0].flip(-1), item[1]


def read_idx(path):
    """An IDX file (MNIST's format, gzipped) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root, split, size):
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(root, f"{prefix}-{kind}-idx{d}-ubyte.gz") for kind, d in (("images", 3), ("labels", 1))]
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"Fashion-MNIST file {path} not found: install Debian's dataset-fashion-mnist "
                             f"(apt-get install dataset-fashion-mnist) or pass --root with the .gz files")
    images, labels = (torch.from_numpy(read_idx(p).copy()) for p in paths)
    return TensorImages(images[:, None], labels, size, *MEAN_STD["fashion-mnist"], pad_to=32 if size >= 28 else None)


def cifar10(root, split, size):
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(root, download=True)
        except Exception as e:  # offline, or no write access: say what to do instead
            raise UsageError(f"CIFAR-10 is not in {folder} and could not be downloaded "
                             f"({type(e).__name__}): pass --root to a copy, or train offline with "
                             f"--data fashion-mnist") from None
    names = sorted(n for n in os.listdir(folder) if n.startswith("data_batch")) if split == "train" \
        else ["test_batch"]
    images, labels = [], []
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                batch = pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise UsageError(f"cannot read CIFAR-10 batch {os.path.join(folder, name)} ({e})") from None
        images.append(torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
        labels.extend(batch["labels"])
    if not images:
        raise UsageError(f"no CIFAR-10 batches in {folder}")
    return TensorImages(torch.cat(images), torch.tensor(labels), size, *MEAN_STD["cifar10"])


def image_folder(root, split, size):
    from torchvision import transforms as T
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"data folder {folder} not found: lay out --root as train/<class>/*.jpg and "
                         f"val/<class>/*.jpg")
    mean, std = MEAN_STD["folder"]
    transform = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(mean, std)])  # the paper's 256 / 224, scaled to any size
    return SafeImageFolder(folder, transform)


def build_dataset(data, root, split, img_size, augment=False, seed=0, subset=None, patch=4):
    """The dataset `data` ("cifar10", "fashion-mnist", "imagenet", "fmow", "folder", "synthetic",
    "pairs"); `patch` matters only to "pairs", whose bits are drawn per patch."""
    if data == "synthetic":
        n_train = subset or 2048
        dataset = SyntheticImages(n_train if split == "train" else 512, img_size, offset=0 if split == "train" else 10**6)
    elif data == "pairs":  # generated: train and val differ by their seeds' offset
        dataset = PairImages((subset or 50000) if split == "train" else 5000, img_size, patch,
                             offset=0 if split == "train" else 10**7)
    elif data == "fashion-mnist":
        dataset = fashion_mnist(root or (FMNIST_DIR if os.path.isdir(FMNIST_DIR) else "data/fashion-mnist"),
                                split, img_size)
    elif data == "cifar10":
        dataset = cifar10(root or "data", split, img_size)
    elif data in ("imagenet", "fmow", "folder"):
        if not root:
            raise UsageError(f"--data {data} needs --root: a folder holding train/ and val/")
        dataset = image_folder(root, split, img_size)
    else:
        raise UsageError(f"unknown --data {data!r}")
    if len(dataset) == 0:
        raise UsageError(f"the {split} split of --data {data} is empty")
    if subset and len(dataset) > subset:  # a fixed subset, the same for every --seed
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:subset].tolist())
    return Flipped(dataset, seed) if augment else dataset


def base_dataset(dataset):
    """The dataset under any Subset / Flipped wrappers."""
    while isinstance(dataset, (Subset, Flipped)):
        dataset = dataset.dataset
    return dataset


def num_classes_of(dataset):
    base = base_dataset(dataset)
    return len(base.classes) if hasattr(base, "classes") else base.num_classes


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, a shard per rank) that can start an epoch part-way."""

    def __init__(self, dataset, world, rank, shuffle, seed):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


# --------------------------------------------------------------------------------------------------
# Orders, schedules, checkpoints, the picture.
# --------------------------------------------------------------------------------------------------

def save_order(path, perm, grid):
    atomic_save({"perm": perm.cpu(), "grid": list(grid)}, path)


def load_order(path, n):
    """A saved order (order.pt of a run, or a LongTensor) of n patches."""
    if not os.path.isfile(path):
        raise UsageError(f"unknown order {path!r}: give one of {', '.join(reorder.ORDERS)}, random, prior, "
                         f"or the path of a saved order.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        perm = obj["perm"] if isinstance(obj, dict) else obj
        return reorder.check_perm(perm.long(), n)
    except Exception as e:
        raise UsageError(f"order file {path} is not an order of {n} patches ({e})") from None


def initial_order(args, grid, train_set, rank, world):
    """(perm, name, prior table or None): the order training starts from, given as a name, "prior"
    (prior.py's pick on a training sample, measured on rank 0), or a saved order's path."""
    n = grid[0] * grid[1]
    if args.order in reorder.ORDERS + ("random",):
        return reorder.order(args.order, *grid, seed=args.seed), args.order, None
    if args.order != "prior":
        return load_order(args.order, n), args.order, None
    import prior
    pick, table = [None], None
    if rank == 0:
        images = prior.sample_images(train_set.dataset, args.prior_n, args.seed)  # unflipped
        table = prior.compressibility(images, args.patch, seed=args.seed, progress=not args.quiet)
        print(prior.format_table(table))
        pick[0] = prior.pick(table)
        print(f"--order prior: starting from {pick[0]}, the least compressible ordering")
    if world > 1:
        dist.broadcast_object_list(pick, src=0)
    return reorder.order(pick[0], *grid), f"prior:{pick[0]}", table


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up, then cosine down to 1% of the base rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def tau_at(step, start_step, steps):
    """Temperature as a fraction of tau_max: a triangle over the `steps` learning steps, 0 -> 1 -> 0,
    one value per step (never exactly 0 inside the phase), and 0 outside it."""
    t = (step - start_step + 0.5) / steps
    return max(0.0, 1 - abs(2 * t - 1)) if 0 < t < 1 else 0.0


@contextmanager
def as_usage_errors():
    """Report reorder.py's ValueErrors (bad sizes, names) as usage errors: one line, exit status 2."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from None


@contextmanager
def atomic_path(path):
    """A temporary path beside `path`, renamed onto it when the block ends: a crash never leaves a torn file."""
    tmp = f"{path}.tmp{os.getpid()}"
    yield tmp
    os.replace(tmp, path)


def atomic_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}): delete it, or "
                         f"choose another --out") from None


def draw_order(perm, grid, path):
    """order.png: each patch coloured by its slot (dark = early), the path drawn through the centres."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import draw_keypoints
    h, w = grid
    cell = max(8, 512 // max(h, w))
    anchors = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                           dtype=torch.float)  # viridis
    slot = perm.argsort().float() / max(h * w - 1, 1)  # each patch's slot, 0 = first, 1 = last
    x = slot * (len(anchors) - 1)
    lo = x.floor().long().clamp(max=len(anchors) - 2)
    colours = anchors[lo] + (x - lo)[:, None] * (anchors[lo + 1] - anchors[lo])  # [N, 3]
    image = colours.T.reshape(3, h, w).repeat_interleave(cell, 1).repeat_interleave(cell, 2).to(torch.uint8)
    centres = torch.stack([(perm % w).float(), (perm // w).float()], 1) * cell + cell / 2  # (x, y) by slot
    image = draw_keypoints(image, centres[None], connectivity=[(k, k + 1) for k in range(h * w - 1)],
                           colors="white", radius=max(1, cell // 8), width=max(1, cell // 10))
    image = draw_keypoints(image, centres[None, :1], colors="red", radius=max(2, cell // 4))
    to_pil_image(image).save(path, format="PNG")


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------

RESUME_KEYS = ("data", "root", "subset", "img_size", "patch", "model", "dim", "depth", "heads", "window",
               "order", "learn_order", "epochs", "batch_size", "warmup_epochs", "policy_start",
               "policy_epochs", "tau_max", "reward", "baseline", "granularity", "seed", "world")


def setup_distributed(device_flag):
    """(rank, world, device): torchrun's environment if present, else one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device here: use --device cpu (or auto)")
    if world == 1:
        return 0, 1, torch.device(device_flag)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_flag == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device_flag == "cuda" else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if device_flag == "cuda" else "cpu")


def amp_dtype(flag, device):
    if device.type != "cuda" or flag == "off":
        return None
    if flag == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def policy_update(policy, policy_opt, perm, tau, reward, baseline, world=1):
    """One REINFORCE step of the policy (§5) on the orders `perm` and their rewards: scored under the
    current logits (on every rank: the orders are rank 0's), gradients averaged over ranks, clipped
    to 5, one AdamW step. Returns log p(perm), detached."""
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
    """(top-1 %, top-5 %) with one order for all images, summed over ranks. (Under DDP the sampler pads
    the last shard with up to world - 1 repeated images, as DistributedSampler does.)"""
    model.eval()
    totals = torch.zeros(3, device=device)  # top-1 correct, top-5 correct, images
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                logits = model(x, perm)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                                   torch.tensor(len(y), device=device)]).float()
    if world > 1:
        dist.all_reduce(totals)
    model.train()
    return (100 * totals[0] / totals[2]).item(), (100 * totals[1] / totals[2]).item()


def train(args):
    """Run (or resume) training; returns a summary dict (final metrics, order, policy logits)."""
    rank, world, device = setup_distributed(args.device)
    args.world = world
    torch.manual_seed(args.seed)
    out = args.out or os.path.join("runs", f"{args.data}-{args.order.replace(os.sep, '_')}"
                                           f"{'-learn' if args.learn_order else ''}-s{args.seed}")
    last = os.path.join(out, "last.pt")

    # ---- everything that can be wrong with the input is checked before anything is written
    with as_usage_errors():
        grid = reorder.grid_size(args.img_size, args.patch)
    if args.window is not None and args.window < 0:
        raise UsageError(f"--window must be >= 0 (0 or none = full attention), got {args.window}")
    if args.learn_order:
        if args.policy_start + args.policy_epochs > args.epochs:
            raise UsageError(f"--policy-start {args.policy_start} + --policy-epochs {args.policy_epochs} "
                             f"exceeds --epochs {args.epochs}")
        if args.baseline == "loo" and args.granularity != "image":
            raise UsageError("--baseline loo needs --granularity image (one order per image)")
    ckpt = None
    if args.resume:
        if not os.path.exists(last):
            raise UsageError(f"nothing to resume: {last} does not exist")
        ckpt = load_checkpoint(last)
        saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
        diff = [k for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
        if not isinstance(ckpt, dict) or "model" not in ckpt or diff:
            what = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {getattr(args, k)})" for k in diff[:3])
            raise UsageError(f"checkpoint {last} does not match this run: it was trained with {what or 'another layout'}; "
                             f"use the same flags, or another --out")
    elif os.path.exists(last):
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")

    train_set = build_dataset(args.data, args.root, "train", args.img_size, augment=True, seed=args.seed,
                              subset=args.subset, patch=args.patch)  # the flip keeps pairs' labels
    val_set = build_dataset(args.data, args.root, "val", args.img_size, subset=args.val_subset, patch=args.patch)
    if len(train_set) < args.batch_size * world:
        raise UsageError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size} "
                         f"x {world} processes: lower --batch-size")
    classes = [getattr(s, "classes", None) for s in (base_dataset(train_set), base_dataset(val_set))]
    if classes[0] != classes[1]:
        raise UsageError(f"train/ and val/ hold different class folders under {args.root}: make them match")
    in_chans = next(item for item in (train_set.dataset[i] for i in range(len(train_set))) if item)[0].shape[0]
    with as_usage_errors():  # reorder.py's own checks (width vs heads, ...)
        cfg = reorder.vit_config(args.model, img_size=args.img_size, patch_size=args.patch, in_chans=in_chans,
                                 num_classes=num_classes_of(train_set), window=args.window,
                                 **{k: v for k, v in (("dim", args.dim), ("depth", args.depth),
                                                      ("heads", args.heads)) if v})
        raw_model = reorder.ViT(cfg).to(device)
    start_perm, order_name, prior_table = (ckpt["start_perm"], ckpt["order_name"], None) if ckpt else \
        initial_order(args, grid, train_set, rank, world)
    start_perm = start_perm.to(device)
    if rank == 0:  # all input checked: from here on the run writes into `out`
        os.makedirs(out, exist_ok=True)
        if prior_table:
            with open(os.path.join(out, "prior.json"), "w") as f:
                json.dump(prior_table, f, indent=1)

    # ---- model, policy, optimizers, schedules
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                             if args.data in ("imagenet", "fmow", "folder") else 0)
    sampler = ResumableSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", collate_fn=collate_skipping_none)
    val_loader = DataLoader(val_set, args.batch_size, sampler=ResumableSampler(val_set, world, rank, False, 0),
                            num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_skipping_none)
    steps_per_epoch = len(sampler) // args.batch_size
    dtype = amp_dtype(args.amp, device)
    model = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    policy = policy_opt = None
    ema = reorder.EMABaseline(0.99)
    policy_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    if args.learn_order:
        policy = reorder.PlackettLuce.from_order(start_perm.cpu()).to(device)  # float32, also under AMP
        policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_lr, weight_decay=0.03)
    learn_from, learn_until = args.policy_start * steps_per_epoch, (args.policy_start + args.policy_epochs) * steps_per_epoch

    epoch, done_in_epoch, history, best = 0, 0, [], -1.0
    stats = dict.fromkeys(("loss", "correct", "images", "tau", "reward", "neg_logp", "policy_steps", "steps"), 0.0)
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scheduler.base_lrs = [args.lr]  # a lowered --lr takes effect on resume
        scaler.load_state_dict(ckpt["scaler"])
        if policy is not None:
            policy.load_state_dict(ckpt["policy"])
            policy_opt.load_state_dict(ckpt["policy_opt"])
        ema.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        policy_gen.set_state(ckpt["rng"]["policy"])
        epoch, done_in_epoch, history, best, stats = (ckpt[k] for k in ("epoch", "done_in_epoch", "history", "best", "stats"))

    def current_order():
        return policy.mode() if policy is not None else start_perm

    def checkpoint(path):
        if rank != 0:
            return
        atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "policy": policy.state_dict() if policy is not None else None,
                     "policy_opt": policy_opt.state_dict() if policy is not None else None,
                     "ema": ema.state_dict(), "start_perm": start_perm.cpu(), "order_name": order_name,
                     "rng": {"cpu": torch.get_rng_state(), "policy": policy_gen.get_state(),
                             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                     "epoch": epoch, "done_in_epoch": done_in_epoch, "history": history, "best": best,
                     "stats": stats, "config": {k: getattr(args, k) for k in RESUME_KEYS}}, path)

    if rank == 0 and not ckpt:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**vars(args), "vit": dataclasses.asdict(cfg), "order_name": order_name,
                       "steps_per_epoch": steps_per_epoch}, f, indent=1)

    # ---- the loop
    while epoch < args.epochs:
        t0 = time.time()
        sampler.set_epoch(epoch)
        sampler.skip = done_in_epoch * args.batch_size
        loader.dataset.epoch = epoch
        bar = tqdm(loader, desc=f"epoch {epoch}", total=steps_per_epoch, initial=done_in_epoch,
                   disable=rank != 0 or args.quiet, leave=False)
        for x, y in bar:
            step = epoch * steps_per_epoch + done_in_epoch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            learning = policy is not None and learn_from <= step < learn_until
            tau = args.tau_max * tau_at(step, learn_from, learn_until - learn_from) if learning else 0.0
            if learning:  # one order for the batch, or one per image; rank 0's, on every rank
                perm, _ = policy.sample(1 if args.granularity == "batch" else len(y), tau, policy_gen)
                if world > 1:
                    dist.broadcast(perm, 0)
            else:
                perm = current_order()[None]
            with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                logits = model(x, perm[0] if len(perm) == 1 else perm)
            per_image = F.cross_entropy(logits.float(), y, reduction="none")
            loss = per_image.mean()
            loss_value = loss.item()  # the step's one host sync for the loss
            if not math.isfinite(loss_value):
                raise UsageError(f"loss is {loss_value} at step {step} (epoch {epoch}): stopped; {last} holds "
                                 f"the last good state; lower --lr (then --resume), or try --amp bf16/off")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            correct = logits.detach().argmax(1) == y
            if learning and tau > 0:  # REINFORCE on the same forward pass (§5)
                reward = -per_image.detach() if args.reward == "xent" else correct.float() * 2 - 1
                mean_reward = reward.mean()
                if world > 1:
                    dist.all_reduce(mean_reward)
                    mean_reward /= world
                baseline = ema(mean_reward.item()) if args.baseline == "ema" else reorder.loo_baseline(reward)
                log_prob = policy_update(policy, policy_opt, perm, tau, reward, baseline, world)
                stats["reward"] += mean_reward.item()
                stats["neg_logp"] -= log_prob.mean().item()
                stats["policy_steps"] += 1
            stats["loss"] += loss_value * len(y)
            stats["correct"] += correct.sum().item()
            stats["images"] += len(y)
            stats["tau"] += tau
            stats["steps"] += 1
            done_in_epoch += 1
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{100 * stats['correct'] / stats['images']:.1f}",
                            tau=f"{tau:.3f}", reward=f"{stats['reward'] / max(1, stats['policy_steps']):.3f}")
            if args.save_every and done_in_epoch % args.save_every == 0 and done_in_epoch < steps_per_epoch:
                checkpoint(last)
        bar.close()

        # ---- end of epoch: validate, log, save
        order_now = current_order()
        top1, top5 = evaluate(model, val_loader, order_now, device, dtype, world)
        p_steps = stats["policy_steps"]
        history.append({
            "epoch": epoch, "phase": "fixed" if epoch * steps_per_epoch < learn_from or policy is None
            else "learn" if epoch * steps_per_epoch < learn_until else "finetune",
            "train_loss": stats["loss"] / stats["images"], "train_top1": 100 * stats["correct"] / stats["images"],
            "val_top1": top1, "val_top5": top5, "lr": scheduler.get_last_lr()[0],
            "tau": stats["tau"] / stats["steps"], "reward": stats["reward"] / p_steps if p_steps else None,
            "entropy": stats["neg_logp"] / p_steps if p_steps else None,  # Monte Carlo, at the sampled tau
            # mean number of slots a patch has moved since the start; argsort(perm) = each patch's slot
            "order_shift": (order_now.argsort() - start_perm.argsort()).abs().float().mean().item(),
            "seconds": time.time() - t0})
        epoch, done_in_epoch = epoch + 1, 0
        stats = dict.fromkeys(stats, 0.0)
        is_best = top1 > best
        best = max(best, top1)
        checkpoint(last)
        if rank == 0:
            if is_best:
                checkpoint(os.path.join(out, "best.pt"))
            with atomic_path(os.path.join(out, "metrics.jsonl")) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in history)
            save_order(os.path.join(out, "order.pt"), order_now, grid)
            draw_order(order_now.cpu(), grid, os.path.join(out, "order.png"))
            h = history[-1]
            print(f"epoch {h['epoch']} {h['phase']}: train loss {h['train_loss']:.4f}, val top-1 {top1:.2f} "
                  f"top-5 {top5:.2f}, tau {h['tau']:.3f}, order shift {h['order_shift']:.2f}, "
                  f"{h['seconds']:.1f} s", flush=True)

    return {"out": out, "history": history, "order": current_order().cpu(),
            "policy_logits": policy.logits.detach().cpu() if policy is not None else None}


def window_arg(text):
    """--window: an int >= 0; 0 or none = full attention."""
    if text.lower() in ("none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {text!r}") from None


def parse_args(argv=None):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument_group("data").add_argument
    a("--data", default="cifar10", choices=["cifar10", "fashion-mnist", "imagenet", "fmow", "folder", "synthetic", "pairs"],
      help="pairs: the known-answer task (PairImages), whose labels need patches h/2 rows apart")
    a("--root", default=None, help="data folder (cifar10: ./data; fashion-mnist: Debian's package folder)")
    a("--subset", type=int, default=None, help="train on a fixed random subset of K images")
    a("--val-subset", type=int, default=None, help="validate on a fixed random subset of K images")
    a("--workers", type=int, default=None, help="loader processes (default: 0 in memory, 8 for folders)")
    a = ap.add_argument_group("model and order").add_argument
    a("--model", default="tiny", choices=sorted(reorder.PRESETS))
    a("--dim", type=int, default=None, help="override the preset's width")
    a("--depth", type=int, default=None, help="override the preset's depth")
    a("--heads", type=int, default=None, help="override the preset's heads")
    a("--img-size", type=int, default=32)
    a("--patch", type=int, default=4)
    a("--window", type=window_arg, default=7,
      help="attention reaches ±window slots; 0 or none = full attention (default 7, the paper's)")
    a("--order", default="row", help=f"initial order: {', '.join(reorder.ORDERS)}, random, prior "
                                     f"(prior.py's pick on a training sample), or a saved order.pt")
    a("--prior-n", type=int, default=512, help="images sampled for --order prior")
    a = ap.add_argument_group("REOrder curriculum (defaults: the paper's 15/30/0.2 of 100 epochs, scaled "
                              "to --epochs)").add_argument
    a("--learn-order", action="store_true", help="learn the order with the Plackett-Luce policy")
    a("--policy-start", type=int, default=None, help="epochs on the fixed order first (default 15%% of --epochs)")
    a("--policy-epochs", type=int, default=None, help="epochs of order learning (default 30%% of --epochs)")
    a("--tau-max", type=float, default=0.2, help="peak of the triangular temperature")
    a("--policy-lr", type=float, default=1e-5, help="policy AdamW lr (paper 1e-5; short runs need ~1e-3)")
    a("--reward", default="xent", choices=["xent", "binary"], help="-cross-entropy, or ±1 right/wrong")
    a("--baseline", default="ema", choices=["ema", "loo"], help="EMA (0.99) or leave-one-out (image granularity)")
    a("--granularity", default="batch", choices=["batch", "image"], help="one order per batch or per image")
    a = ap.add_argument_group("training").add_argument
    a("--epochs", type=int, default=100)
    a("--batch-size", type=int, default=128, help="per process")
    a("--lr", type=float, default=1e-4)
    a("--weight-decay", type=float, default=0.03)
    a("--warmup-epochs", type=int, default=None, help="default 5%% of --epochs (paper: 5 of 100)")
    a("--clip", type=float, default=5.0)
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="CUDA only: bf16 where supported, else fp16")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a("--seed", type=int, default=0)
    a = ap.add_argument_group("output").add_argument
    a("--out", default=None, help="run folder (default runs/<data>-<order>[-learn]-s<seed>)")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--save-every", type=int, default=500, help="also checkpoint every N steps within an epoch (0 = off)")
    a("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    e = args.epochs
    if args.policy_start is None:
        args.policy_start = max(1, round(0.15 * e)) if e >= 3 else 0
    if args.policy_epochs is None:
        args.policy_epochs = max(1, min(round(0.30 * e), e - args.policy_start - (1 if e >= 3 else 0)))
    if args.warmup_epochs is None:
        args.warmup_epochs = round(0.05 * e)
    for name in ("epochs", "batch_size", "prior_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
