"""The data layer of train.py and prior.py: data sets, known-answer tasks, saved orders, checks.

Every data set yields (float image [C, H, W], normalized; int label). The one random augmentation,
the paper's horizontal flip, is a pure function of (seed, epoch, index): a resumed run sees the
images it would have seen, for any number of loader workers. Bad input raises UsageError, which
both command lines print as one line with exit status 2.
"""
import argparse
import ctypes
import gzip
import hashlib
import io
import math
import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager, suppress

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

import reorder

GENERATED = ("synthetic", "pairs", "neighbours", "majority")  # made from the index: any number
DATASETS = ("cifar10", "fashion-mnist", "imagenet", "fmow", "folder") + GENERATED
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
ON_CORES = " (the cores this process may run on)"  # the most worker processes a flag may ask
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "fashion-mnist": ((0.2860,), (0.3530,)),
            "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # ImageNet's, also fMoW's


# ---- command lines: one-line errors, checked numbers, files written whole ------------------------


class UsageError(ValueError):
    """Bad input: reported as one line, exit status 2, nothing overwritten."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with errors on one line (exit status 2) instead of usage text plus the error."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """train.py's and prior.py's --help: each option's default, where it has one that is not
    computed from others."""

    def _get_help_string(self, action):
        shown = action.default not in (None, argparse.SUPPRESS) and action.default is not False \
            and "default" not in action.help
        return action.help + (" (default: %(default)s)" if shown else "")


def number(cast=float, low=None, above=None, high=None, why=""):
    """An argparse type: cast(text), finite, >= low, > above, <= high (`why`: the reason for high,
    shown); in size an integer below 2**63 (torch's int64), a float 0 or within 1e-30..1e30; else a
    one-line error. The model and the policy train in float32, which ends at 3.4e38: a flag past
    1e30 overflows where the optimizers scale it (AdamW's first step is 10 x lr), one under 1e-30
    where it divides (tau)."""
    def parse(text):
        try:
            value = cast(text) + 0  # -0.0 + 0 is 0.0
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        real = isinstance(value, float)  # an int is exact at any size (math.isfinite overflows)
        fits = value == 0 or 1e-30 <= abs(value) <= 1e30 if real else abs(value) < 2 ** 63
        for bad, rule in ((real and not math.isfinite(value), "finite"),
                          (low is not None and value < low, f"at least {low}"),
                          (above is not None and not value > above, f"> {above}"),
                          (high is not None and value > high, f"at most {high}{why}"),
                          (not fits, "0 or within 1e-30..1e30 in size" if real else
                           "below 2**63 in size")):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def one_line(e):
    """An exception as "Type: message" on one line, the message cut to 160 characters."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_writable(path, file=False):
    """A UsageError unless `path` can be written: a folder in which a file can be made, or
    (file=True) a file that atomic_path can make or replace. What does not exist yet is checked
    at the nearest folder above it (where it will be made); a link to nowhere or a loop on the
    way is refused. Tried with a nameless file: nothing is left."""
    where = path if file else f"into {path}"
    if not path:
        raise UsageError("cannot write into an empty path: name a folder or a file")
    if file and os.path.exists(path) and not (os.path.islink(path) or os.path.isfile(path)):
        raise UsageError(f"cannot write {path}: it is a folder, or not a regular file")
    if file and os.path.lexists(f"{path}.tmp"):
        raise UsageError(f"cannot write {path}: {path}.tmp is in the way (a killed write's "
                         f"leftover? remove it)")
    existing = os.path.abspath(os.path.dirname(path) if file else path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot write {where}: {existing} is " + (
            "a link to nowhere, or a loop" if os.path.islink(existing) else "a file, not a folder"))
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UsageError(f"cannot write {where} ({one_line(e)})") from None


@contextmanager
def atomic_path(path, mode="wb"):
    """A new file path.tmp, open in `mode`, renamed onto `path` when the block ends: never a torn
    file. path.tmp is made with O_EXCL: a link or a file already there (a user's, or a killed
    write's, which train.py removes under its lock) is neither followed nor overwritten. If the
    block fails (a full disk, say), path.tmp is removed and `path` kept as it was; an OSError
    becomes one line. (One writer per folder: train.py's lock.)"""
    tmp, made = f"{path}.tmp", False
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode) as f:
            made = True
            yield f
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write {path} ({one_line(e)}); the file is as it was") from None
    finally:
        if made:
            with suppress(FileNotFoundError):  # renamed already, unless the block failed
                os.remove(tmp)


def atomic_save(obj, path):
    """torch.save through atomic_path, bytes as they are; serialized first, so that a failed write
    is an OSError."""
    if not isinstance(obj, bytes):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        obj = buffer.getvalue()
    with atomic_path(path) as f:
        f.write(obj)


def keep_freed_memory():
    """glibc: keep freed memory for the next step; fresh pages (by default for every block over 32
    MiB) cost a page fault each, most of a long sequence's time (tests/bench.py). Process-wide:
    train.py, prior.py and bench.py call it at start-up. A no-op without glibc."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: never serve a block by mmap
        libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: glibc reads -1 as SIZE_MAX, never trim the heap


# ---- image data sets -----------------------------------------------------------------------------


class TensorImages(Dataset):
    """Images held as uint8 [n, C, h, w] (10 classes): scaled, resized to `size`, normalized."""
    num_classes = 10

    def __init__(self, images, labels, size, mean, std):
        self.images, self.labels, self.size = images, labels, size
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              antialias=True)[0]
        return (x - self.mean) / self.std, int(self.labels[i])


class SyntheticImages(Dataset):
    """Class templates plus noise, generated from the index alone: for tests and smoke runs."""

    def __init__(self, n, size, num_classes=10, offset=0):
        self.n, self.size, self.num_classes, self.offset = n, size, num_classes, offset
        g = torch.Generator().manual_seed(1234)
        self.templates = torch.randn(num_classes, 3, size, size, generator=g)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.offset + i)
        label = int(torch.randint(self.num_classes, (), generator=g))
        noise = torch.randn(3, self.size, self.size, generator=g)
        return self.templates[label] * 0.5 + noise, label


class SafeImageFolder(Dataset):
    """root/<class>/.../<image> listed as torchvision's ImageFolder lists it (the same classes and
    order), but opening only regular files (a FIFO blocks forever) and following no link to a
    folder below the class folders (a loop would list a class ~40 times): each entry skipped is
    named once. An image that PIL cannot read, or refuses as too large (a decompression bomb, e.g.
    a big fMoW tile), is None, with a one-line warning."""

    def __init__(self, root, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS
        self.transform, self.samples = transform, []
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        for label, name in enumerate(self.classes):
            for folder, folders, files in sorted(os.walk(os.path.join(root, name))):
                linked = {f for f in folders if os.path.islink(os.path.join(folder, f))}
                images = {f for f in files if f.lower().endswith(IMG_EXTENSIONS)}
                for f in sorted(linked | images):
                    path = os.path.join(folder, f)
                    if f in images and os.path.isfile(path):  # a link to an image is read
                        self.samples.append((path, label))
                    else:
                        why = "a link to a folder" if f in linked else "not a regular file"
                        print(f"warning: skipping {path} ({why})", file=sys.stderr)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # unidentified: OSError
            print(f"warning: skipping unreadable image {path} ({type(e).__name__})",
                  file=sys.stderr)
            return None


def collate_skipping_none(batch):
    """default_collate without the unreadable images; None if none of the batch is readable."""
    items = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(items) if items else None


def readable_items(dataset, indices=None):
    """The items of `dataset` at `indices` (default: all) that are not unreadable images (None)."""
    for i in range(len(dataset)) if indices is None else indices:
        item = dataset[int(i)]
        if item is not None:
            yield item


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


def download(dataset_class, folder, what, advice):
    """A torchvision data set downloaded into `folder` through a temporary folder beside it: a
    failed download (offline, a broken mirror) is one line and leaves nothing behind."""
    parent, tmp = os.path.dirname(os.path.abspath(folder)), None
    created = not os.path.isdir(parent)
    try:  # a folder that cannot be made (read-only, under a file) fails as a download does
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
        dataset_class(tmp, download=True)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    except Exception as e:
        raise UsageError(f"{what} is not in {folder} and could not be downloaded ({one_line(e)}): "
                         f"{advice}") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if created and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)


def read_idx(path):
    """A gzipped IDX file (MNIST's: 0, 0, 8 for uint8, ndim, big-endian sizes, data) as a tensor;
    anything else (not gzip, truncated, a wrong header or size, no regular file) is one line."""
    try:
        if not os.path.isfile(path):
            raise ValueError("not a regular file")
        with gzip.open(path, "rb") as f:
            idx = bytearray(f.read())
        shape = [int.from_bytes(idx[4 + 4 * k:8 + 4 * k], "big") for k in range(idx[3])]
        if idx[:3] != b"\0\0\x08" or len(idx) != 4 + 4 * len(shape) + math.prod(shape):
            raise ValueError("not an IDX file of uint8: its header or its size is wrong")
        return torch.frombuffer(idx, dtype=torch.uint8, offset=4 + 4 * idx[3]).view(shape)
    except (OSError, EOFError, ValueError, IndexError, zlib.error) as e:  # BadGzipFile: OSError
        raise UsageError(f"cannot read {path} ({one_line(e)})") from None


def fashion_mnist(root, split, size):
    """Fashion-MNIST's gzipped IDX files in `root` or root/FashionMNIST/raw (torchvision's layout).
    With no --root: Debian's package folder if installed, else ./data, downloaded when missing."""
    from torchvision.datasets import FashionMNIST
    prefix = "train" if split == "train" else "t10k"
    paths = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    root = root or (FMNIST_DIR if os.path.isdir(FMNIST_DIR) else "data")
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        if all(os.path.lexists(os.path.join(folder, p)) for p in paths):
            break
    else:
        download(FashionMNIST, root, f"Fashion-MNIST ({paths[0]})",
                 "install Debian's dataset-fashion-mnist, or pass --root with its .gz files")
        return fashion_mnist(root, split, size)
    images, labels = (read_idx(os.path.join(folder, p)) for p in paths)
    if images.shape[1:] != (28, 28) or labels.dim() != 1 or len(labels) != len(images) or (
            labels > 9).any():
        raise UsageError(f"{folder}: {paths[0]} and {paths[1]} do not hold n images of 28 x 28 "
                         f"and their n labels 0..9 (they hold {tuple(images.shape)} and "
                         f"{tuple(labels.shape)})")
    images = images[:, None]
    if size >= 32:  # the usual 28 -> 32; 28 and below as they are
        p = (32 - images.shape[-1]) // 2
        images = F.pad(images, (p, p, p, p))
    return TensorImages(images, labels, size, *MEAN_STD["fashion-mnist"])


def cifar10(root, split, size):
    """CIFAR-10's pickle batches in root/cifar-10-batches-py, read and MD5-checked by torchvision,
    downloaded when missing."""
    from torchvision.datasets import CIFAR10
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        download(CIFAR10, root, "CIFAR-10",
                 "pass --root to a copy, or train offline with --data fashion-mnist")
    try:  # torchvision opens every batch, where a FIFO would block forever
        batches = [os.path.join(root, CIFAR10.base_folder, name) for name, _ in
                   CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], 0]]]
        odd = [path for path in batches if os.path.lexists(path) and not os.path.isfile(path)]
        if odd:
            raise ValueError(f"{odd[0]} is not a regular file")
        found = CIFAR10(root, train=split == "train")
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # corrupt or missing batches
        raise UsageError(f"cannot read CIFAR-10 in {root} ({one_line(e)})") from None
    images = torch.from_numpy(found.data).permute(0, 3, 1, 2).contiguous()  # [n, 3, 32, 32]
    return TensorImages(images, torch.tensor(found.targets), size, *MEAN_STD["cifar10"])


def image_folder(root, split, size):
    """root/split/<class>/<image>: resized by the paper's 256 / 224 (scaled to `size`), cropped."""
    from torchvision import transforms as T
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"data folder {folder} not found: lay out --root as train/<class>/*.jpg "
                         f"and val/<class>/*.jpg")
    transform = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(*MEAN_STD["folder"])])
    images = SafeImageFolder(folder, transform)
    empty = sorted(set(images.classes) - {images.classes[label] for _, label in images.samples})
    if empty or not images.classes:
        raise UsageError(f"no images in {os.path.join(folder, *empty[:1])}: expected "
                         f"{folder}/<class>/<image>.jpg")
    return images


# ---- known-answer tasks: the label compares pairs of patches, far apart in row-major order ------


def pairs_of(h, w, gap):
    """[h*w/2, 2] patch ids (first, partner): (r, c) with (r + gap, c), for the rows r with r // gap
    even. gap = h/2: the top half with the bottom half; gap = 1: each even row with the next."""
    r = torch.arange(h)
    first = (r[(r // gap) % 2 == 0][:, None] * w + torch.arange(w)).flatten()
    return torch.stack([first, first + gap * w], 1)


def pair_order(h, w, gap=None):
    """[h*w]: every patch right before its partner, the pairs in row-major order of the first."""
    return pairs_of(h, w, gap or h // 2).flatten()


def slot_gaps(perm, pairs):
    """Slots between the two patches of each pair ([P, 2] ids) in the order(s) perm:
    [..., N] -> [..., P]; 1: side by side."""
    slots = perm.argsort(-1)  # where each patch sits
    return (slots[..., pairs[:, 0]] - slots[..., pairs[:, 1]]).abs().float()


def side_by_side(perm, pairs):
    """How many of the pairs ([P, 2] patch ids) the order perm [N] puts side by side."""
    return int((slot_gaps(perm.cpu(), pairs) == 1).sum())


def pair_gaps(perm, h, w, gap=None):
    """slot_gaps of the pairs_of(h, w, gap) (default gap h/2): [..., N] -> [..., h*w/2]."""
    return slot_gaps(perm, pairs_of(h, w, gap or h // 2))


def pair_distance(perm, h, w, gap=None):
    """Mean number of slots between the two patches of a pair: [..., N] -> [...]."""
    return pair_gaps(perm, h, w, gap).mean(-1)


class PairImages(Dataset):
    """Each patch shows one bit (plus noise); patch (r, c) is paired with (r + gap, c) (pairs_of).

    Label 0: every partner repeats its first patch's bit; label 1: a fraction `mismatch` of the
    pairs, at random, differ. Each patch alone is uniformly random: chance is 50%. --data pairs:
    gap = h/2, half of the pairs differ, h/2 · w slots apart in row-major order, far beyond a small
    window. --data neighbours: gap = 1, every pair differs, so any one pair in reach decides the
    label; w slots apart in row-major order, 1 in column-major. pair_order reaches ~100%. With
    `balanced`, exactly half of the first patches are dark, so both labels have half of all
    patches dark: counting them, an order-blind shortcut, gives 50% (not 92.45% on neighbours,
    58.55% on pairs). --data majority: gap = h/2, a fraction votes[label] of the pairs, at random,
    differ (1/4 for label 0, 3/4 for label 1), so each pair the model can read is one more vote
    (graded, not all-or-nothing); half of the differing pairs and half of the matching ones are
    dark, so every image is half dark. Generated from the index alone, each image once (then kept:
    1 KiB at 16 x 16); a horizontal flip keeps the label.
    """
    num_classes = 2

    def __init__(self, n, size, patch, gap=None, offset=0, mismatch=0.5, noise=0.5,
                 balanced=False, votes=None):
        h, w = reorder.grid_size(size, patch)
        gap = gap or max(1, h // 2)  # one row of patches: no partner at any gap
        if h % (2 * gap):
            raise UsageError(f"this pairs task needs a multiple of {2 * gap} patch rows, got {h} "
                             f"(--img-size {size} / --patch {patch}): e.g. --img-size 32 --patch 4")
        self.n, self.patch, self.grid, self.offset = n, patch, (h, w), offset
        self.pairs, self.noise, self.balanced = pairs_of(h, w, gap), noise, balanced
        self.mismatches = round(mismatch * len(self.pairs))
        self.votes = votes and [round(v * len(self.pairs)) for v in votes]
        self.made = {}  # index: (image, label), each made once

    def __len__(self):
        return self.n

    def bits(self, i):
        """(bits [h, w] of image i, label, the generator that drew them)."""
        (h, w), g = self.grid, torch.Generator().manual_seed(self.offset + i)
        first = torch.randint(2, (len(self.pairs),), generator=g)
        if self.balanced:  # exactly half dark, in a random place
            first = (torch.randperm(len(first), generator=g) < len(first) // 2).long()
        label = int(torch.randint(2, (), generator=g))
        partner = first.clone()
        if self.votes:  # majority: a fraction votes[label] of the pairs, at random, differ
            differ = torch.randperm(len(first), generator=g)
            differ, same = differ[:self.votes[label]], differ[self.votes[label]:]
            first.zero_()
            for group in (differ, same):  # half of each dark: every image is half dark
                first[group[torch.randperm(len(group), generator=g)[:len(group) // 2]]] = 1
            partner = first.clone()
            partner[differ] ^= 1
        elif label:
            partner[torch.randperm(len(first), generator=g)[:self.mismatches]] ^= 1
        bits = torch.empty(h * w, dtype=torch.long)
        bits[self.pairs[:, 0]], bits[self.pairs[:, 1]] = first, partner
        return bits.view(h, w), label, g

    def __getitem__(self, i):
        if i not in self.made:
            self.made[i] = self.make(i)
        return self.made[i]

    def make(self, i):
        bits, label, g = self.bits(i)
        # a bit is the patch's upper half bright (0) or dark (1), not its mean, which the patch
        # embedding's LayerNorm removes; both patterns are their own horizontal mirror images
        p = self.patch
        edge = torch.where(torch.arange(p) < p // 2, 1.0, -1.0)[:, None].expand(p, p)
        cells = edge * (1 - 2 * bits.float())[:, :, None, None]  # [h, w, p, p]
        image = cells.permute(0, 2, 1, 3).reshape(bits.shape[0] * p, -1)  # [h*p, w*p]
        return (image + self.noise * torch.randn(image.shape, generator=g))[None], label


# ---- a data set by name --------------------------------------------------------------------------


def build_dataset(data, root, split, img_size, augment=False, seed=0, subset=None, patch=4):
    """The data set `data` (one of DATASETS) for `split` ("train" or "val"); `patch` matters only
    to the pairs tasks. `subset` keeps a fixed random K images, the same for every seed."""
    train = split == "train"
    if data == "synthetic":
        dataset = SyntheticImages((subset or 2048) if train else 512, img_size,
                                  offset=0 if train else 10**6)
    elif data in ("pairs", "neighbours", "majority"):  # generated: train and val differ by seeds
        neighbours, majority = data == "neighbours", data == "majority"
        dataset = PairImages((subset or 50000) if train else 5000, img_size, patch,
                             gap=1 if neighbours else None, offset=0 if train else 10**7,
                             mismatch=1.0 if neighbours else 0.5, balanced=neighbours,
                             votes=(0.25, 0.75) if majority else None)
    elif data == "fashion-mnist":
        dataset = fashion_mnist(root, split, img_size)
    elif data == "cifar10":
        dataset = cifar10(root or "data", split, img_size)
    elif data in ("imagenet", "fmow", "folder"):
        if not root:
            raise UsageError(f"--data {data} needs --root: a folder holding train/ and val/")
        dataset = image_folder(root, split, img_size)
    else:
        raise UsageError(f"unknown --data {data!r}: choose one of {', '.join(DATASETS)}")
    if len(dataset) == 0:
        raise UsageError(f"the {split} split of --data {data} is empty")
    if subset and len(dataset) > subset:
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:subset]
        dataset = Subset(dataset, keep.tolist())
    return Flipped(dataset, seed) if augment else dataset


def base_dataset(dataset):
    """The data set under any Subset / Flipped wrappers."""
    while isinstance(dataset, (Subset, Flipped)):
        dataset = dataset.dataset
    return dataset


def num_classes_of(dataset):
    base = base_dataset(dataset)
    return len(base.classes) if hasattr(base, "classes") else base.num_classes


# ---- saved orders: {"perm": LongTensor [N], "grid": [h, w]}, train.py's order.pt -----------------


def save_order(path, perm, grid):
    atomic_save({"perm": perm.cpu(), "grid": list(grid)}, path)


def read_torch(path, follow=True):
    """torch.load of a file this project wrote, weights_only (a pickle runs no code), with what
    torch.load skips: a regular file (a FIFO would block), whose zip records all match their
    CRC-32 (a damaged tensor would load silently); zipfile reads the file once more (about 1.6x
    torch.load's time: tests/bench.py --only resume). follow=False: a symbolic link at `path` is
    refused (a run folder's files are read, as written, through no link). A ValueError says what
    is wrong."""
    if not os.path.isfile(path):
        raise ValueError("not a regular file")
    with open(path, "rb", opener=None if follow else lambda p, flags: os.open(
            p, flags | os.O_NOFOLLOW)) as f:
        with zipfile.ZipFile(f) as archive:
            damaged = archive.testzip()
        if damaged:
            raise ValueError(f"its record {damaged} fails its CRC-32 check")
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=True)


def check_order(perm, n):
    """perm if it is one order of n patches: a LongTensor [n], a permutation of 0..n-1."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.long or perm.dim() != 1:
        raise ValueError(f"one order is a LongTensor [{n}], not "
                         f"{getattr(perm, 'dtype', type(perm).__name__)} "
                         f"{tuple(getattr(perm, 'shape', ()))}")
    return reorder.check_perm(perm, n)


def load_order(path, grid):
    """A saved order (a run's order.pt, or a LongTensor) of the h x w `grid`, checked where it
    enters: one order of integers, a permutation of 0..h*w-1, saved for the same grid."""
    if not os.path.lexists(path):
        raise UsageError(f"unknown order {path!r}: give one of {', '.join(reorder.ORDERS)}, "
                         f"random, prior, or the path of a saved order.pt")
    try:
        obj = read_torch(path)
        perm = obj["perm"] if isinstance(obj, dict) else obj
        if isinstance(obj, dict) and list(obj.get("grid", grid)) != list(grid):
            raise ValueError(f"it was saved for a {obj['grid'][0]} x {obj['grid'][1]} grid")
        if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
            raise ValueError(f"its values are {perm.dtype}, not integers")
        return check_order(perm.long(), grid[0] * grid[1])
    except Exception as e:
        raise UsageError(f"order file {path} is not an order of {grid[0]} x {grid[1]} patches "
                         f"({one_line(e)})") from None


VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                       dtype=torch.float)
PAIR_COLOURS = ["#e6194b", "#f58231", "#ffe119", "#3cb44b", "#42d4f4", "#4363d8", "#f032e6",
                "#a9a9a9", "#800000", "#9a6324", "#808000", "#000075"]  # a few distinct colours


def label_font():
    """Pillow's own font at 12 px: at its default 10 px the spaces between words vanish."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=12)
    except (ImportError, TypeError):  # Pillow without FreeType, or before 10.1: its bitmap font
        return ImageFont.load_default()


def draw_orders(path, grid, orders, columns=4, pairs=None):
    """One PNG of orders ({title: perm}) side by side: each patch coloured by its slot (dark =
    early), the path through the patch centres in white, the first patch marked red. With pairs
    ([P, 2] patch ids, a known-answer task): each pair's two patches dotted in one colour, and the
    step between partners drawn in that colour where the order puts them side by side."""
    from PIL import Image, ImageDraw
    (h, w), cell, columns = grid, max(6, 224 // max(grid)), min(columns, len(orders))
    pw, ph = w * cell, h * cell
    rows = -(-len(orders) // columns)
    sheet = Image.new("RGB", (columns * (pw + 12) + 12, rows * (ph + 30) + 12), "white")
    pen = ImageDraw.Draw(sheet)
    pen.font = label_font()
    for k, (title, perm) in enumerate(orders.items()):
        x0, y0 = 12 + (k % columns) * (pw + 12), 12 + (k // columns) * (ph + 30)
        pen.text((x0, y0), title, fill="black")
        x = perm.argsort().float() / max(h * w - 1, 1) * (len(VIRIDIS) - 1)  # each patch's slot
        lo = x.floor().long().clamp(max=len(VIRIDIS) - 2)
        colours = VIRIDIS[lo] + (x - lo)[:, None] * (VIRIDIS[lo + 1] - VIRIDIS[lo])  # [N, 3]
        for patch, colour in enumerate(colours.round().int().tolist()):
            r, c = divmod(patch, w)
            pen.rectangle([x0 + c * cell, y0 + 16 + r * cell, x0 + (c + 1) * cell - 1,
                           y0 + 16 + (r + 1) * cell - 1], fill=tuple(colour))
        centre = [(x0 + (p % w) * cell + cell // 2, y0 + 16 + (p // w) * cell + cell // 2)
                  for p in range(h * w)]
        pen.line([centre[p] for p in perm.tolist()], fill="white", width=max(1, cell // 10))
        dot = max(2, cell // 4)
        near = [] if pairs is None else (slot_gaps(perm, pairs) == 1).tolist()
        for i, pair in enumerate([] if pairs is None else pairs.tolist()):
            colour = PAIR_COLOURS[i % len(PAIR_COLOURS)]
            if near[i]:  # side by side in this order
                (ax, ay), (bx, by) = centre[pair[0]], centre[pair[1]]
                side = cell / 5 * (1 if pair[0] // w % 2 else -1) / math.hypot(bx - ax, by - ay)
                shift = (side * (ay - by), side * (bx - ax))  # beside the path, not on it
                pen.line([(ax + shift[0], ay + shift[1]), (bx + shift[0], by + shift[1])],
                         fill=colour, width=max(2, cell // 6))
            for (cx, cy) in (centre[pair[0]], centre[pair[1]]):
                pen.ellipse([cx - dot // 2, cy - dot // 2, cx + dot // 2, cy + dot // 2],
                            fill=colour, outline="black")
        (cx, cy) = centre[int(perm[0])]
        pen.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], outline="red", width=2)
    sheet.save(path, format="PNG", optimize=True)


def draw_curve(path, history, pairs=0):
    """A PNG of val top-1 (%) per epoch (blue) and, for a known-answer task of `pairs` pairs, the
    share of partners side by side (orange), over the phases (fixed, learn, finetune) shaded."""
    from PIL import Image, ImageDraw
    width, height, left, top, bottom = 480, 300, 40, 34, 36
    x1, y1 = width - 12, height - bottom
    sheet = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(sheet)
    pen.font = label_font()
    n = max(len(history), 2)
    xs = [left + (x1 - left) * i / (n - 1) for i in range(n)]
    for i, line in enumerate(history):  # the phases as bands behind the curves
        shade = {"fixed": "#f2f2f2", "learn": "#dde8f7", "finetune": "#e5f2e0"}[line["phase"]]
        half = (x1 - left) / (n - 1) / 2
        pen.rectangle([max(left, xs[i] - half), top, min(x1, xs[i] + half), y1], fill=shade)
    for tick in range(0, 101, 25):
        y = y1 - (y1 - top) * tick / 100
        pen.line([left, y, x1, y], fill="#bbbbbb")
        pen.text((6, y - 5), f"{tick}%", fill="black")
    series = [("val top-1", "#1f4fbf", [line["val_top1"] for line in history])]
    if pairs:
        series.append(("partners side by side", "#e07b00",
                       [100 * line.get("side_by_side", 0) / pairs for line in history]))
    for k, (name, colour, values) in enumerate(series):
        points = [(xs[i], y1 - (y1 - top) * v / 100) for i, v in enumerate(values) if v is not None]
        if len(points) > 1:
            pen.line(points, fill=colour, width=2)
        for (x, y) in points:
            pen.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        pen.text((left + 120 * k, 8), name, fill=colour)
    pen.text((left, 20), "phases: fixed (grey), learn (blue), finetune (green)", fill="#555555")
    step = next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500) if n / k <= 12 or k == 500)
    for i in range(0, len(history), step):  # epoch ticks, about 12 or fewer
        pen.line([xs[i], y1, xs[i], y1 + 4], fill="black")
        pen.text((xs[i] - 3 * len(str(i)), y1 + 6), str(i), fill="black")
    pen.text((x1 - 30, y1 + 17), "epoch", fill="black")
    sheet.save(path, format="PNG", optimize=True)
