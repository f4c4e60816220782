"""The compressibility prior (§4 of the paper): how compressible is each ordering's patch sequence?

The paper LZMA-compresses each image's VQ tokens (Chameleon's tokenizer, not released) in every
ordering, as a unigram and a bigram stream. We rebuild it from parts we own: (1) a seeded k-means
codebook over the sample's patch vectors (the "VQ" step); (2) each image's codes in every ordering
as a unigram and a non-overlapping bigram stream of fixed-width little-endian symbols; (3) raw
LZMA2, compression = % size reduction of the payload without LZMA2's chunk framing, so that
incompressible data scores 0%; (4) mean ± standard error over images, a rank per ordering, and
the ordering to start the policy from: the least compressible one, as in the paper's introduction.

    python prior.py --data fashion-mnist --n 1000 --img-size 32 --patch 4 --out prior.json
"""
import itertools
import json
import lzma
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import data
import reorder


def fit_codebook(vectors: torch.Tensor, size: int, seed: int = 0, iters: int = 20,
                 max_points: int = 20000) -> torch.Tensor:
    """k-means codebook [size, D] of vectors [M, D]: seeded Lloyd steps on <= max_points of them."""
    g = torch.Generator().manual_seed(seed)
    points = vectors[torch.randperm(len(vectors), generator=g)[:max_points]].float()
    size = min(size, len(points))
    centres = points[torch.randperm(len(points), generator=g)[:size]].clone()
    for _ in range(iters):
        dist = torch.cdist(points, centres)
        assign = dist.argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=size)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters at the points worst served by their centre
            worst = dist.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)
            centres[empty] = points[worst[:int(empty.sum())]]
    return centres


def encode(vectors: torch.Tensor, codebook: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """Nearest codebook entry of every vector: [..., D] -> [...] (int64), in blocks of memory."""
    flat = vectors.reshape(-1, vectors.shape[-1]).float()
    codes = torch.cat([torch.cdist(flat[i:i + block], codebook).argmin(1)
                       for i in range(0, len(flat), block)])
    return codes.reshape(vectors.shape[:-1])


def payload_bytes(stream: bytes, preset: int = 6) -> int:
    """Size of `stream` compressed by raw LZMA2, without LZMA2's chunk headers and end marker."""
    # A dictionary as large as the stream compresses exactly as the preset's 8 MiB one, 30x faster.
    dict_size = max(4096, 1 << max(len(stream) - 1, 1).bit_length())
    blob = lzma.compress(stream, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}])
    size, i = 0, 0
    while blob[i] != 0x00:  # the chunks, up to the end marker 0x00
        if blob[i] < 0x80:  # 0x01, 0x02 stored: control, size - 1 (2 bytes), the data
            header, n = 3, int.from_bytes(blob[i + 1:i + 3], "big") + 1
        else:  # LZMA: control, unpacked size, packed size - 1 (2 bytes), props from 0xC0, data
            header, n = 5 + (blob[i] >= 0xC0), int.from_bytes(blob[i + 3:i + 5], "big") + 1
        size, i = size + n, i + header + n
    return size


def streams(codes: np.ndarray, codebook_size: int):
    """(unigram, bigram) byte streams of one code sequence [N], fixed-width little-endian symbols.

    Bigrams are non-overlapping pairs (c0 c1)(c2 c3)..., symbol c_2k * K + c_2k+1 (an odd last code
    left out): a codebook of 256 gives exactly 1- and 2-byte symbols, no slack bits for LZMA to
    find. (Overlapping pairs would write every code twice, a redundancy even noise "compresses".)
    """
    K = codebook_size
    pairs = codes[0:len(codes) - 1:2].astype(np.int64) * K + codes[1::2]
    return codes.astype(_dtype(K)).tobytes(), pairs.astype(_dtype(K * K)).tobytes()


def _dtype(vocabulary: int) -> str:
    return next(f"<u{b}" for b in (1, 2, 4, 8) if vocabulary <= 1 << (8 * b))


def score_images(job):
    """Compression % [n, orders, 2 (unigram, bigram)] of a block of code sequences (one job)."""
    codes, perms, codebook_size, preset = job
    out = np.empty((len(codes), len(perms), 2))
    for i, seq in enumerate(codes):
        for j, perm in enumerate(perms):
            for s, stream in enumerate(streams(seq[perm], codebook_size)):
                saved = 1.0 - payload_bytes(stream, preset) / len(stream) if stream else 0.0
                out[i, j, s] = 100.0 * saved
    return out


def _default_signals():
    """A worker leaves Ctrl-C to the parent and dies by SIGTERM, which ends the pool, even when
    forked from train.py's handlers (otherwise a deadlock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def compressibility(images: torch.Tensor, patch_size: int, orders=None, codebook: int = 256,
                    seed: int = 0, preset: int = 6, workers=None, progress: bool = True) -> dict:
    """Per-ordering compression of images [n, C, H, W] (float or uint8); a JSON-ready table (§4).

    orders: {name: perm} (default: the six of reorder.ORDERS). Rows are ranked by the mean of the
    unigram and bigram compression, 1 = most compressible. Results do not depend on `workers`.
    """
    if len(images) == 0:
        raise ValueError("no images to measure: the dataset or sample is empty")
    h, w = reorder.grid_size(tuple(images.shape[-2:]), patch_size)
    orders = orders or {name: reorder.order(name, h, w) for name in reorder.ORDERS}
    for perm in orders.values():
        reorder.check_perm(perm, h * w)
    vectors = reorder.patchify(images.float(), patch_size)  # [n, N, C*p*p]
    centres = fit_codebook(vectors.reshape(-1, vectors.shape[-1]), codebook, seed)
    codes = encode(vectors, centres).numpy().astype(np.int64)
    perms = np.stack([perm.numpy() for perm in orders.values()])

    workers = workers or data.CORES
    block = max(1, min(256, math.ceil(len(codes) / (4 * workers))))  # ~4 jobs a worker
    jobs = [(codes[i:i + block], perms, len(centres), preset) for i in range(0, len(codes), block)]
    pool = mp.get_context().Pool(workers, _default_signals) if workers > 1 else nullcontext()
    results = []
    with pool, tqdm(total=len(codes), desc="prior", unit="img", disable=not progress,
                    leave=False) as bar:
        for result in (pool.imap if workers > 1 else map)(score_images, jobs):
            results.append(result)
            bar.update(len(result))
    scores = np.concatenate(results)  # [n, orders, 2]

    mean = scores.mean(0)
    se = scores.std(0, ddof=1) / math.sqrt(len(scores)) if len(scores) > 1 else np.zeros_like(mean)
    overall = mean.mean(1)
    rank = {j: r + 1 for r, j in enumerate(np.argsort(-overall, kind="stable"))}
    rows = {name: {"unigram": float(mean[j, 0]), "unigram_se": float(se[j, 0]),
                   "bigram": float(mean[j, 1]), "bigram_se": float(se[j, 1]),
                   "score": float(overall[j]), "rank": rank[j]}
            for j, name in enumerate(orders)}
    return {"grid": [h, w], "images": len(codes), "codebook": len(centres), "orders": rows}


def pick(table: dict):
    """The ordering to start the policy from: the least compressible (the paper's introduction);
    None in a tie for it (constant images, --codebook 1), where the prior prefers none."""
    scores = {name: row["score"] for name, row in table["orders"].items()}
    least = [name for name, score in scores.items() if score == min(scores.values())]
    return least[0] if len(least) == 1 else None


def format_table(table: dict) -> str:
    lines = [f"{'order':<10} {'unigram %':>16} {'bigram %':>16} {'rank':>5}"]
    for name, row in sorted(table["orders"].items(), key=lambda kv: kv[1]["rank"]):
        lines.append(f"{name:<10} {row['unigram']:>8.2f} ± {row['unigram_se']:<5.2f} "
                     f"{row['bigram']:>8.2f} ± {row['bigram_se']:<5.2f} {row['rank']:>5}")
    return "\n".join(lines)


def sample_images(dataset, n: int, seed: int) -> torch.Tensor:
    """n images [n, C, H, W] of a dataset of (image, label), drawn reproducibly; unreadable images
    (None) are skipped."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: point --root at a folder with images")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    images = [item[0] for item in itertools.islice(data.readable_items(dataset, idx), n)]
    if not images:
        raise ValueError("no readable image in the dataset: every one failed to load")
    return torch.stack(images)


def main(argv=None):
    ap = data.OneLineParser(description=__doc__, formatter_class=data.HelpFormatter)
    a, count = ap.add_argument, data.number(int, 1)
    cores = data.number(int, 1, high=data.CORES, why=data.ON_CORES)
    a("--data", default="fashion-mnist", choices=data.DATASETS, help="the data set")
    a("--root", default=None, help="data folder (default: the dataset's usual place)")
    a("--n", type=count, default=1000, metavar="N", help="images to sample from the training split")
    a("--img-size", type=count, default=32, metavar="PX", help="image side, after resizing")
    a("--patch", type=count, default=4, metavar="PX", help="patch side: a grid of img-size / patch")
    a("--codebook", type=count, default=256, metavar="K", help="k-means codes, the VQ vocabulary")
    a("--preset", type=int, default=6, choices=range(10), metavar="0-9",
      help="LZMA preset, 0 fastest to 9 smallest")
    a("--seed", type=data.number(int, 0, high=2 ** 32 - 2), default=0, metavar="N",
      help="seeds the image sample and k-means")
    a("--workers", type=cores, default=data.CORES, help="processes (default: all cores)")
    a("--order-file", action="append", default=[],
      help="also score a saved order (repeatable; default: none)")
    a("--out", default="prior.json", help="the table as JSON (its folder is made)")
    args = ap.parse_args(argv)

    try:  # every check before loading any data
        h, w = reorder.grid_size(args.img_size, args.patch)
        data.check_writable(args.out, file=True)
        orders = {name: reorder.order(name, h, w) for name in reorder.ORDERS}
        for path in args.order_file:  # named by path: two runs' order.pt stay apart
            if path in orders:
                raise data.UsageError(f"--order-file {path} is given twice or names a built-in "
                                      f"ordering: rename the file")
            orders[path] = data.load_order(path, (h, w))
        dataset = data.build_dataset(args.data, args.root, "train", args.img_size,
                                     patch=args.patch)
        images = sample_images(dataset, args.n, args.seed)
        start = time.perf_counter()
        table = compressibility(images, args.patch, orders, args.codebook, args.seed, args.preset,
                                args.workers)
        seconds = time.perf_counter() - start
        table.update(pick=pick(table), config=vars(args))
        print(format_table(table))
        print(f"start the policy from: {table['pick']} (the least compressible ordering)"
              if table["pick"] else "a tie: no one ordering is the least compressible, so the "
                                    "prior picks none")
        print(f"{table['images']} images x {len(orders)} orderings x 2 streams in {seconds:.1f} s "
              f"({table['images'] / seconds:.0f} images/s, {args.workers} workers)")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with data.atomic_path(args.out, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"prior.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
