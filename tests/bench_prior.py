"""prior.py throughput: images per second with 1 and with 2 worker processes, and the ratio.

    python tests/bench_prior.py          # 1,000 Fashion-MNIST training images (synthetic if not installed)

Times the whole compressibility() call (k-means codebook, encoding, 6 orderings x 2 LZMA streams per
image) and, separately, the codebook + encoding step that does not depend on the worker count, so
the ratio of the parallel part can be read off too. A script, not a test.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import prior  # noqa: E402
import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if os.path.exists(os.path.join(train.FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        source = "Fashion-MNIST"
        images = prior.sample_images(train.build_dataset("fashion-mnist", None, "train", 32), args.n, 0)
    else:
        source = "synthetic"
        images = prior.sample_images(train.build_dataset("synthetic", None, "train", 32), args.n, 0)

    def best_of(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    vectors = prior.reorder.patchify(images, 4)
    codebook_s = best_of(lambda: prior.encode(vectors, prior.fit_codebook(vectors.reshape(-1, vectors.shape[-1]), 256)))
    total = {w: best_of(lambda: prior.compressibility(images, 4, workers=w, progress=False)) for w in (1, 2)}
    print(f"{args.n} {source} images, 32 x 32, patch 4, codebook 256, 6 orderings x 2 streams; "
          f"{os.cpu_count()} cores, best of {args.repeats}")
    print(f"codebook + encoding (same for any workers): {codebook_s:.2f} s")
    for w in (1, 2):
        print(f"{w} worker{'s' if w > 1 else ' '}: {total[w]:.2f} s, {args.n / total[w]:.0f} images/s "
              f"(scoring alone {total[w] - codebook_s:.2f} s)")
    print(f"2 workers vs 1: {total[1] / total[2]:.2f}x end to end, "
          f"{(total[1] - codebook_s) / (total[2] - codebook_s):.2f}x on the scoring stage")


if __name__ == "__main__":
    main()
