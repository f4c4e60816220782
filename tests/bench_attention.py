"""Windowed vs dense masked attention, forward + backward: time and peak memory, with ratios.

    python tests/bench_attention.py            # batch 4, width 192, 3 heads, N = 197 (±7), 1024, 4096, 16384 (±64)
    python tests/bench_attention.py --dense-max 4096   # skip dense above this N (it is N^2 in memory)

Times: windowed and dense run alternately in one process (so drift hits both alike), median of runs
until 2 s have passed. Peak memory: each case in a fresh subprocess (CUDA: max_memory_allocated;
CPU: the process's peak RSS above what it held before the call). A script, not a test.
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
import reorder  # noqa: E402


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


def times(n, window, kinds, args, device):
    """Median seconds of forward + backward per kind, the kinds run alternately so drift hits all alike."""
    q, k, v = inputs(n, args.batch, args.dim, args.heads, device)
    fns = {kind: attend_fn(kind, n, window, q, k, v) for kind in kinds}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {kind: [] for kind in kinds}
    for fn in fns.values():  # warm-up
        step(fn, q, k, v)
    while min(len(r) for r in runs.values()) < args.repeats or \
            (sum(sum(r) for r in runs.values()) < 2.0 and len(runs[kinds[0]]) < 50):
        for kind, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            step(fn, q, k, v)
            sync()
            runs[kind].append(time.perf_counter() - t0)
    return {kind: statistics.median(r) for kind, r in runs.items()}


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="at least this many runs, more until 2 s")
    ap.add_argument("--dense-max", type=int, default=4096, help="largest N at which dense is timed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak", nargs=3, metavar=("N", "WINDOW", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.peak:
        print(peak_bytes(int(args.peak[0]), int(args.peak[1]), args.peak[2], args, device))
        return

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"width {args.dim}, {args.heads} heads; forward + backward, median of >= {args.repeats} runs")
    print(f"{'N':>6} {'window':>6} | {'windowed ms':>11} {'dense ms':>9} {'speed-up':>8} | "
          f"{'windowed MiB':>12} {'dense MiB':>9}")
    results = {}
    for n, window in [(197, 7), (1024, 64), (4096, 64), (16384, 64)]:
        kinds = ["windowed", "dense"] if n <= args.dense_max else ["windowed"]
        sec = times(n, window, kinds, args, device)
        peak = {}
        for kind in kinds:
            cmd = [sys.executable, __file__, "--peak", str(n), str(window), kind, "--batch", str(args.batch),
                   "--dim", str(args.dim), "--heads", str(args.heads), "--device", args.device]
            peak[kind] = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        results[n] = (sec["windowed"], peak["windowed"])
        nan = float("nan")
        print(f"{n:>6} {window:>6} | {sec['windowed'] * 1e3:>11.2f} {sec.get('dense', nan) * 1e3:>9.2f} "
              f"{sec.get('dense', nan) / sec['windowed']:>7.2f}x | {peak['windowed'] / 2**20:>12.1f} "
              f"{peak.get('dense', nan) / 2**20:>9.1f}")
    (t4, m4), (t16, m16) = results[4096], results[16384]
    print(f"windowed 16384 / 4096 (4x the tokens): time {t16 / t4:.2f}x, peak memory {m16 / max(m4, 1):.2f}x")


if __name__ == "__main__":
    main()
