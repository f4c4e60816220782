"""Benchmarks (README "Results"): one run prints four tables, each with its ratios.

    python tests/bench.py                        # all four sections
    python tests/bench.py --only attention       # or throughput, policy, prior (comma-separated)

attention   windowed vs dense masked attention, forward + backward, N = 197 (±7), 1024, 4096, 16384
            (±64): time (the kinds run alternately, median) and peak memory (a fresh process per case)
throughput  images/s of a whole training step (forward, backward, clip, AdamW) of the tiny and small
            presets at 32 x 32 / patch 4 and 224 / patch 16, windowed (±7) and full attention
policy      the share of a --learn-order training step spent in the policy: Gumbel-top-k sample,
            log-prob, REINFORCE loss and its backward, the policy's AdamW step
prior       prior.py's images/s on 1,000 Fashion-MNIST images (synthetic if not installed), 1 and 2 workers
A script, not a test: nothing here asserts a time.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import prior  # noqa: E402
import data  # noqa: E402
import reorder  # noqa: E402
import train  # noqa: E402


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def inputs(n, batch, dim, heads, device):
    torch.manual_seed(0)
    return [torch.randn(batch, heads, n + 1, dim // heads, device=device, requires_grad=True) for _ in range(3)]


def attend_fn(kind, n, window, q, k, v):
    if kind == "dense":
        mask = reorder.window_mask(n, window, q.device)  # built once: the baseline gets its mask for free
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return lambda: reorder.window_attention(q, k, v, window)


def step(attend, q, k, v):
    attend().sum().backward()
    q.grad = k.grad = v.grad = None


def median_times(fns, device, repeats, budget_s=2.0):
    """{name: median seconds of fn()}, the fns run alternately (so drift hits all alike) after one
    warm-up call each, at least `repeats` rounds and more until `budget_s` has passed (50 at most)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    while min(len(r) for r in runs.values()) < repeats or \
            (sum(sum(r) for r in runs.values()) < budget_s and len(next(iter(runs.values()))) < 50):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            runs[name].append(time.perf_counter() - t0)
    return {name: statistics.median(r) for name, r in runs.items()}


def peak_bytes(n, window, kind, args, device):
    """Peak memory of one forward + backward above the inputs (run in a fresh process)."""
    q, k, v = inputs(n, args.batch, args.dim, args.heads, device)
    fn = attend_fn(kind, n, window, q, k, v)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, q, k, v)
        return torch.cuda.max_memory_allocated() - base
    base = rss_bytes()
    step(fn, q, k, v)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)



def bench_attention(args, device):
    print(f"\n## attention: batch {args.batch}, width {args.dim}, {args.heads} heads; forward + backward, "
          f"median of >= {args.repeats} alternating runs")
    print(f"{'N':>6} {'window':>6} | {'windowed ms':>11} {'dense ms':>9} {'speed-up':>8} | "
          f"{'windowed MiB':>12} {'dense MiB':>9}")
    results = {}
    for n, window in [(197, 7), (1024, 64), (4096, 64), (16384, 64)]:
        kinds = ["windowed", "dense"] if n <= args.dense_max else ["windowed"]
        q, k, v = inputs(n, args.batch, args.dim, args.heads, device)
        sec = median_times({kind: (lambda fn=attend_fn(kind, n, window, q, k, v): step(fn, q, k, v)) for kind in kinds},
                           device, args.repeats)
        del q, k, v
        peak = {}
        for kind in kinds:
            cmd = [sys.executable, __file__, "--peak", str(n), str(window), kind, "--batch", str(args.batch),
                   "--dim", str(args.dim), "--heads", str(args.heads), "--device", args.device]
            peak[kind] = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        results[n] = (sec["windowed"], peak["windowed"])
        dense = (f"{sec['dense'] * 1e3:>9.2f} {sec['dense'] / sec['windowed']:>7.2f}x" if "dense" in sec
                 else f"{'(N^2)':>9} {'':>8}")
        print(f"{n:>6} {window:>6} | {sec['windowed'] * 1e3:>11.2f} {dense} | {peak['windowed'] / 2**20:>12.1f} "
              + (f"{peak['dense'] / 2**20:>9.1f}" if 'dense' in peak else f"{'-':>9}"))
    (t4, m4), (t16, m16) = results[4096], results[16384]
    print(f"windowed 16384 / 4096 (4x the tokens): time {t16 / t4:.2f}x, peak memory {m16 / max(m4, 1):.2f}x")


def training_step(model, optimizer, images, labels, perm, dtype):
    """train.model_step on fixed inputs: forward, cross-entropy, backward, clip 5, AdamW, schedule."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(images.device.type, enabled=dtype == torch.float16)
    return lambda: train.model_step(model, optimizer, scheduler, scaler, images, labels, perm, dtype,
                                    5.0)


def setup(preset, img_size, patch, window, batch, device):
    torch.manual_seed(0)
    model = reorder.ViT(reorder.vit_config(preset, img_size=img_size, patch_size=patch, window=window)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(10, (batch,), device=device)
    return model, optimizer, images, labels


def bench_throughput(args, device):
    dtype = train.amp_dtype("auto", device)
    print(f"\n## training throughput: images/s of forward + backward + clip + AdamW, batch {args.train_batch}, "
          f"{'autocast ' + str(dtype) if dtype else 'float32'}, median of >= 3 alternating steps")
    print(f"{'model':>6} {'image':>6} {'patch':>5} {'tokens':>6} | {'windowed ±7':>11} {'full':>8} {'full/windowed':>13}")
    for preset in ("tiny", "small"):
        for img_size, patch in ((32, 4), (224, 16)):
            fns = {}
            for name, window in (("windowed", 7), ("full", None)):
                model, optimizer, images, labels = setup(preset, img_size, patch, window, args.train_batch, device)
                fns[name] = training_step(model, optimizer, images, labels, reorder.order("row", *model.grid), dtype)
            sec = median_times(fns, device, 3, budget_s=1.0)
            ips = {name: args.train_batch / s for name, s in sec.items()}
            print(f"{preset:>6} {img_size:>6} {patch:>5} {(img_size // patch) ** 2:>6} | {ips['windowed']:>11.1f} "
                  f"{ips['full']:>8.1f} {ips['full'] / ips['windowed']:>12.2f}x")


def bench_policy(args, device):
    """Model step and policy step timed separately, alternately; share = policy / (model + policy)."""
    dtype = train.amp_dtype("auto", device)
    print(f"\n## policy share of a --learn-order step: tiny, windowed ±7, batch {args.train_batch}, tau 0.1")
    print(f"{'image':>6} {'patch':>5} {'granularity':>11} | {'model ms':>9} {'policy ms':>9} {'policy share':>12}")
    for img_size, patch in ((32, 4), (224, 16)):
        for granularity in ("batch", "image"):
            model, optimizer, images, labels = setup("tiny", img_size, patch, 7, args.train_batch, device)
            policy = reorder.PlackettLuce.from_order(reorder.order("row", *model.grid)).to(device)
            policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.03)
            ema, gen = reorder.EMABaseline(0.99), torch.Generator(device=device).manual_seed(0)
            orders = 1 if granularity == "batch" else args.train_batch
            perm = policy.sample(orders, 0.1, gen)[0]
            model_step = training_step(model, optimizer, images, labels, perm[0] if orders == 1 else perm, dtype)

            def policy_step():  # train.py's: sample, baseline, then train.policy_update
                sampled, _ = policy.sample(orders, 0.1, gen)
                reward = -torch.rand(args.train_batch, device=device)
                train.policy_update(policy, policy_opt, sampled, 0.1, reward, ema(reward.mean().item()))
            sec = median_times({"model": model_step, "policy": policy_step}, device, 5, budget_s=1.0)
            print(f"{img_size:>6} {patch:>5} {granularity:>11} | {sec['model'] * 1e3:>9.2f} {sec['policy'] * 1e3:>9.3f} "
                  f"{100 * sec['policy'] / (sec['model'] + sec['policy']):>11.2f}%")


def bench_prior(args, device):
    have_fmnist = os.path.exists(os.path.join(data.FMNIST_DIR, "train-images-idx3-ubyte.gz"))
    source = "fashion-mnist" if have_fmnist else "synthetic"
    images = prior.sample_images(data.build_dataset(source, None, "train", 32), args.prior_n, 0)
    vectors = reorder.patchify(images, 4)

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    codebook_s = best_of(lambda: prior.encode(vectors, prior.fit_codebook(vectors.reshape(-1, vectors.shape[-1]), 256)))
    total = {w: best_of(lambda: prior.compressibility(images, 4, workers=w, progress=False)) for w in (1, 2)}
    print(f"\n## prior.py: {args.prior_n} {source} images, 32 x 32, patch 4, codebook 256, 6 orderings x 2 "
          f"streams, best of 3; codebook + encoding (the same for any workers) {codebook_s:.2f} s")
    for w in (1, 2):
        print(f"{w} worker{'s' if w > 1 else ' '}: {total[w]:.2f} s, {args.prior_n / total[w]:.0f} images/s "
              f"(scoring alone {total[w] - codebook_s:.2f} s)")
    print(f"2 workers vs 1: {total[1] / total[2]:.2f}x end to end, "
          f"{(total[1] - codebook_s) / (total[2] - codebook_s):.2f}x on the scoring stage")


SECTIONS = {"attention": bench_attention, "throughput": bench_throughput, "policy": bench_policy, "prior": bench_prior}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4, help="attention: batch")
    ap.add_argument("--dim", type=int, default=192, help="attention: width")
    ap.add_argument("--heads", type=int, default=3, help="attention: heads")
    ap.add_argument("--repeats", type=int, default=5, help="attention: at least this many runs, more until 2 s")
    ap.add_argument("--dense-max", type=int, default=4096, help="attention: largest N at which dense is timed")
    ap.add_argument("--train-batch", type=int, default=None, help="throughput, policy: batch (32 on CPU, 128 on CUDA)")
    ap.add_argument("--prior-n", type=int, default=1000, help="prior: images")
    ap.add_argument("--peak", nargs=3, metavar=("N", "WINDOW", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.peak:
        print(peak_bytes(int(args.peak[0]), int(args.peak[1]), args.peak[2], args, device))
        return
    sections = args.only.split(",")
    if set(sections) - set(SECTIONS):
        ap.error(f"unknown section(s) {', '.join(sorted(set(sections) - set(SECTIONS)))}: choose from {', '.join(SECTIONS)}")
    args.train_batch = args.train_batch or (128 if device.type == "cuda" else 32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"# device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    for section in sections:
        SECTIONS[section](args, device)


if __name__ == "__main__":
    main()
