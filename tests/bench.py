"""Benchmarks (README "Results"): one run prints a table per section, each with its ratios.

    python tests/bench.py                        # every section
    python tests/bench.py --only attention,scan  # or any sections below (comma-separated)
    python tests/bench.py --tiny                 # every section at tiny sizes (a smoke test)

attention   windowed vs dense masked attention, forward + backward, N = 197 (±7), 1024, 4096,
            16384 (±64): time (the kinds run alternately, median) and peak memory (a fresh
            process per case)
scan        the Mamba layers (width 192, d_state 16, batch 1), forward + backward: mamba and
            bimamba at N = 196, 1024, 4096; mamba at 16384; time, peak memory, growth with N
mamba       the scan (torch path, and the C loop where it builds), forward + backward, against
            its floor (its flops per state entry at this thread's rate of torch's elementwise
            work in cache); a training step, mamba and bimamba against window, at 196 tokens
            (28 px, patch 2, width 64, depth 4, batch 64) and the Results' 49-token plateau size
            (patch 4, width 16, depth 2, batch 32), one thread and two, and bimamba with its
            scan replaced by y = dt x; bytes saved for backward at the paper's size, mamba and
            bimamba against window ±7
recurrence  reorder.selective_scan's torch path against its C loop (on CPU), the recurrence
            slot by slot under autograd (the tests' reference), mambapy's pscan (if installed)
            and, on CUDA, its Triton kernels; forward + backward, E = 192 (--dim), S = 16, (B, L)
            from (1, 197) to (64, 197), (1, 4096)
faults      time per 4x tokens without and with data.keep_freed_memory() (each in a fresh
            process, as mallopt cannot be undone): windowed attention 4096 -> 16384, the mamba
            layer 1024 -> 4096 -> 16384
throughput  images/s of a whole training step (train.model_step: forward, backward, clip, AdamW)
            of the tiny preset at 32 x 32 / patch 4 and 224 / patch 16, for every mixer
policy      the cost of a --learn-order step: the model's part with K orders (one trained, the
            others scored on the same images) against a fixed-order step, and the policy's
            share (Gumbel-top-k sample, log-prob, REINFORCE loss and backward, SGD step)
prior       prior.py's images/s on 1,000 Fashion-MNIST images (synthetic if not installed), 1
            and 2 workers
loader      train.py's image-folder loader on 512 JPEGs of 500 x 375 (written to a temporary
            folder): decode and the paper's transform, images/s with 0, 2 and all cores' workers
paper       the paper's size (base, 224 px, patch 16, 197 tokens, batch 2) for window ±7,
            causal, mamba and bimamba: the bytes autograd saves for backward per image and a
            training step (train.model_step + AdamW), each against window ±7
resume      what --resume adds to torch.load of a 1 GiB last.pt (a Base model with AdamW): the
            zip's CRC-32 check (data.read_torch) and the finite check (train.check_checkpoint)
A script, not a test: nothing here asserts a time (tests/test_model.py runs --tiny). The main
process calls data.keep_freed_memory(), as train.py does. Sizes above are the full run's.
"""
import argparse
import importlib.util
import os
import math
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import prior  # noqa: E402
import data  # noqa: E402
import reorder  # noqa: E402
import train  # noqa: E402


def high_water_bytes():
    """This process image's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux keeps
    that across exec, so a child of a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def inputs(n, batch, dim, heads, device):
    torch.manual_seed(0)
    return [torch.randn(batch, heads, n + 1, dim // heads, device=device, requires_grad=True)
            for _ in range(3)]


def attend_fn(kind, n, window, q, k, v):
    if kind == "dense":
        mask = reorder.window_mask(n, window, device=q.device)  # built once, for free
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return lambda: reorder.window_attention(q, k, v, window)


def step(attend, q, k, v):
    attend().sum().backward()
    q.grad = k.grad = v.grad = None


def median_times(fns, device, repeats, budget_s=2.0, clock=time.perf_counter):
    """{name: median seconds of fn()}, the fns run alternately (so drift hits all alike) after one
    warm-up call each, at least `repeats` rounds and more until `budget_s` has passed (50 at
    most). clock: wall time, or time.process_time (this process's CPU time: what other jobs'
    load does not count, on one thread the same as wall time on a quiet machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    while min(len(r) for r in runs.values()) < repeats or \
            (sum(sum(r) for r in runs.values()) < budget_s and len(next(iter(runs.values()))) < 50):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            runs[name].append(clock() - t0)
    return {name: statistics.median(r) for name, r in runs.items()}


def case_fn(kind, n, window, args, device):
    """(the step to time, its inputs): an attention kind on [batch, heads, 1+n, d], or "scan", the
    Mamba layer on [1, n, width]."""
    if kind in ("scan", "bimamba"):  # N patches on a square-ish grid, no CLS
        torch.manual_seed(0)
        h = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
        layer = reorder.Mamba(args.dim, directions=1 if kind == "scan" else 4,
                              grid=(h, n // h)).to(device)
        x = torch.randn(1, n, args.dim, device=device, requires_grad=True)
        return (lambda: layer(x).sum().backward()), x
    q, k, v = inputs(n, args.batch, args.dim, args.heads, device)
    fn = attend_fn(kind, n, window, q, k, v)
    return (lambda: step(fn, q, k, v)), q


def peak_bytes(n, window, kind, args, device):
    """Peak memory of one forward + backward above the inputs (run in a fresh process)."""
    fn, _ = case_fn(kind, n, window, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    case_fn(kind, 16, window and min(window, 4), args, device)[0]()  # load kernels, allocators
    base = rss_bytes()
    fn()
    return max(high_water_bytes() - base, 0)


def peak_in_fresh_process(n, window, kind, args):
    cmd = [sys.executable, __file__, "--peak", str(n), str(window), kind, "--batch",
           str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads), "--device",
           args.device]
    # glibc moves its mmap threshold as memory is freed, so later tensors may land on the heap and
    # the peak RSS would depend on the order of allocations; a fixed threshold maps every large
    # tensor afresh and returns it when freed, so the peak is that of live memory (repeatable)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True,
                              env=env).stdout.split()[-1])


def time_in_fresh_process(n, window, kind, args, keep):
    """Median seconds of a case in a fresh process that calls data.keep_freed_memory() or not."""
    cmd = [sys.executable, __file__, "--time", str(n), str(window), kind, "--batch",
           str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads), "--device",
           args.device, "--repeats", str(args.repeats)] + (["--keep"] if keep else [])
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def bench_faults(args, device):
    print(f"\n## page faults: forward + backward, median of >= {args.repeats} runs, each case in a "
          f"fresh process without / with data.keep_freed_memory()")
    print(f"{'case':>16} {'N':>6} | {'before ms':>10} {'after ms':>9} | {'before x':>8} "
          f"{'after x':>7} (per 4x tokens)")
    for kind, window, ns in (("windowed", 64, args.fault_attention), ("scan", None, args.fault_scan)):
        last = None
        for n in ns:
            now = [time_in_fresh_process(n, window, kind, args, keep) for keep in (False, True)]
            growth = (f"{now[0] / last[0]:>7.2f}x {now[1] / last[1]:>6.2f}x" if last
                      else f"{'':>8} {'':>7}")
            name = "attention ±64" if kind == "windowed" else "mamba layer"
            print(f"{name:>16} {n:>6} | {now[0] * 1e3:>10.1f} {now[1] * 1e3:>9.1f} | {growth}")
            last = now


def mambapy_scan(x, dt, A, B, C, D):
    """mambapy's selective scan (its Blelloch pscan over the states [B, L, E, S], autograd for
    the backward): measured only, not a dependency (run where it is installed)."""
    from mambapy.pscan import pscan
    dt = F.softplus(dt)
    hs = pscan(torch.exp(dt[..., None] * A), (dt * x)[..., None] * B[:, :, None])
    return (hs @ C[..., None]).squeeze(-1) + D * x


def bench_recurrence(args, device):
    from test_scan import scan_inputs, scan_reference  # the slot-by-slot loop of the tests
    fns = {"torch": lambda *t: reorder.selective_scan(*t, backend="torch"), "loop": scan_reference}
    if device.type == "cpu" and reorder._c_loop(torch.zeros(1)):
        fns["c"] = lambda *t: reorder.selective_scan(*t, backend="c")
    if importlib.util.find_spec("mambapy"):
        fns["pscan"] = mambapy_scan
    if device.type == "cuda":
        fns["triton"] = lambda *t: reorder.selective_scan(*t, backend="triton")
    print(f"\n## the selective scan: x, dt [B, L, {args.dim}], S = 16, one core, forward + "
          f"backward, median of >= 3 alternating runs; torch, c (CPU) and triton (CUDA) paths "
          f"of reorder.selective_scan, the recurrence slot by slot under autograd (B L <= 8192) "
          f"and mambapy's pscan (if installed)")
    print(f"{'B':>3} {'L':>5} | " + " ".join(f"{k + ' ms':>9}" for k in fns) + " | "
          + " ".join(f"{k + '/torch':>12}" for k in fns if k != "torch"))
    for batch, n in args.rec_sizes:
        inputs = [t.detach().to(device).requires_grad_()
                  for t in scan_inputs(batch, n, args.dim, 16, None)]

        def run(fn):
            return lambda: torch.autograd.grad(fn(*inputs).sum(), inputs)
        cases = {k: run(fn) for k, fn in fns.items() if k != "loop" or batch * n <= 8192}
        sec = median_times(cases, device, 3, budget_s=1.0)
        print(f"{batch:>3} {n:>5} | " + " ".join(f"{sec[k] * 1e3:>9.1f}" if k in sec
                                                 else f"{'-':>9}" for k in fns) + " | "
              + " ".join(f"{sec[k] / sec['torch']:>11.2f}x" if k in sec else f"{'-':>12}"
                         for k in fns if k != "torch"))
        del inputs


def bench_attention(args, device):
    print(f"\n## attention: batch {args.batch}, width {args.dim}, {args.heads} heads; forward + "
          f"backward, median of >= {args.repeats} alternating runs")
    print(f"{'N':>6} {'window':>6} | {'windowed ms':>11} {'dense ms':>9} {'speed-up':>8} | "
          f"{'windowed MiB':>12} {'dense MiB':>9}")
    results = {}
    for n, window in args.attention_sizes:
        kinds = ["windowed", "dense"] if n <= args.dense_max else ["windowed"]
        sec = median_times({kind: case_fn(kind, n, window, args, device)[0] for kind in kinds},
                           device, args.repeats)
        peak = {kind: peak_in_fresh_process(n, window, kind, args) for kind in kinds}
        results[n] = (sec["windowed"], peak["windowed"])
        dense = (f"{sec['dense'] * 1e3:>9.2f} {sec['dense'] / sec['windowed']:>7.2f}x"
                 if "dense" in sec else f"{'(N^2)':>9} {'':>8}")
        dense_mib = f"{peak['dense'] / 2**20:>9.1f}" if "dense" in peak else f"{'-':>9}"
        print(f"{n:>6} {window:>6} | {sec['windowed'] * 1e3:>11.2f} {dense} | "
              f"{peak['windowed'] / 2**20:>12.1f} {dense_mib}")
    (n4, (t4, m4)), (n16, (t16, m16)) = list(results.items())[-2:]
    print(f"windowed {n16} / {n4}: time {t16 / t4:.2f}x, peak memory {m16 / max(m4, 1):.2f}x")


def bench_scan(args, device):
    print(f"\n## Mamba layers: batch 1, width {args.dim}, d_state 16; forward + backward, median "
          f"of >= {args.repeats} runs; N patches on a square grid")
    print(f"{'layer':>8} {'N':>6} | {'ms':>9} {'ms / 1k slots':>13} | {'MiB':>8}")
    results = {}
    for kind, ns in (("scan", args.layer_sizes + args.layer_long), ("bimamba", args.layer_sizes)):
        for n in ns:
            sec = median_times({kind: case_fn(kind, n, None, args, device)[0]}, device,
                               args.repeats)[kind]
            results[kind, n] = (sec, peak_in_fresh_process(n, None, kind, args))
            print(f"{'mamba' if kind == 'scan' else kind:>8} {n:>6} | {sec * 1e3:>9.1f} "
                  f"{sec * 1e6 / n:>13.2f} | {results[kind, n][1] / 2**20:>8.1f}")
    for n in args.layer_sizes:
        print(f"bimamba / mamba at N = {n}: time "
              f"{results['bimamba', n][0] / results['scan', n][0]:.2f}x")


# the scan's arithmetic per state entry (row, slot, channel e, state s): forward 6 flops (Δ A,
# Δ x B, a h + b, C · h); backward 19 (recompute Δ A, Δ x B, a h + b; g = C gy + a g; q = g a h;
# then Σ_s q A, Σ_s g B, Σ Δ q, Σ_e g Δ x, Σ_e gy h, a multiply and an add each); exp(Δ A)
# twice
SCAN_FLOPS, SCAN_EXPS = 6 + 19, 2


def elementwise_rates(n=2 ** 16, calls=64):
    """This thread's rate of torch's elementwise work in cache: flop/s of addcmul_ (2 flops an
    entry) and exp/s (of Δ A's range, -5 to 0), each on vectors of n float32 (256 KB: three fit
    in L2), best of 5 runs of CPU time."""
    a, b, c = -5 * torch.rand(3, n)
    rates = []
    for op, per_entry in ((lambda: c.addcmul_(a, b), 2), (lambda: torch.exp(a, out=c), 1)):
        best = math.inf
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(calls):
                op()
            best = min(best, time.process_time() - t0)
        rates.append(per_entry * n * calls / best)
    return rates


def free_scan(step):
    """step with reorder.selective_scan replaced by y = dt x: what the rest of a Mamba model costs
    (a lower bound on a step with any scan)."""
    def run():
        with mock.patch.object(reorder, "selective_scan", lambda x, dt, *_: dt * x):
            step()
    return run


def bench_mamba(args, device):
    """The scan against its floor; a training step, mamba and bimamba against window, at the
    issue's 196-token size and the Results' 49-token plateau size, one thread and two, and bimamba
    with a free scan (free_scan); the bytes autograd saves for backward at ViT-Base."""
    from test_scan import scan_inputs
    threads = torch.get_num_threads()
    c_loop = device.type == "cpu" and reorder._c_loop(torch.zeros(1)) is not None
    backends = ["torch"] + ["c"] * c_loop
    print(f"\n## the scan against its floor: forward + backward of reorder.selective_scan's "
          f"{' and '.join(backends)} paths, 4 cores, S = 16, median of >= 3 alternating runs, one "
          f"thread, CPU time")
    torch.set_num_threads(1)
    flop_rate, exp_rate = elementwise_rates()
    print(f"floor = R L E S x ({SCAN_FLOPS} flops / {flop_rate / 1e9:.1f} GFLOP/s + {SCAN_EXPS} "
          f"exp / {exp_rate / 1e9:.2f} G exp/s), the rates of addcmul_ and exp on 256 KB "
          f"vectors in cache, this thread")
    for R, L, E in args.floor_sizes:
        inputs = scan_inputs(R, L, E, 16, 4)
        sec = median_times({b: lambda b=b: torch.autograd.grad(
            reorder.selective_scan(*inputs, backend=b).sum(), inputs) for b in backends}, device,
            3, clock=time.process_time)
        floor = R * L * E * 16 * (SCAN_FLOPS / flop_rate + SCAN_EXPS / exp_rate)
        print(f"R {R:>4} L {L:>4} E {E:>3}: floor {floor * 1e3:>7.1f} ms; " + "; ".join(
            f"{b} {sec[b] * 1e3:>7.1f} ms, {sec[b] / floor:.1f}x the floor" for b in backends))
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        print(f"\n## a training step (train.model_step + AdamW), float32, {n_threads} "
              f"thread{'s' * (n_threads > 1)}: median of >= 3 alternating steps "
              f"({'CPU' if n_threads == 1 else 'wall'} time), each against window in the same "
              f"process")
        for name, (img, patch, dim, depth, batch, window) in args.step_sizes.items():
            fns = {}
            for mixer in ("window", "mamba", "bimamba", "free scan"):
                model, optimizer, images, labels = setup(
                    "tiny", img, patch, batch, device, dim=dim, depth=depth, heads=2,
                    mixer=mixer.replace("free scan", "bimamba"), window=window)
                fns[mixer] = training_step(model, optimizer, images, labels,
                                           [reorder.order("row", *model.grid)], None)
            fns["free scan"] = free_scan(fns["free scan"])
            sec = median_times(fns, device, 3, budget_s=1.0,
                               clock=time.process_time if n_threads == 1 else time.perf_counter)
            print(f"{name}: window ±{window} {sec['window'] * 1e3:.0f} ms, " + ", ".join(
                f"{k} {sec[k] * 1e3:.0f} ms ({sec[k] / sec['window']:.2f}x)"
                for k in ("mamba", "bimamba", "free scan")))
    torch.set_num_threads(threads)
    model_name, img, patch, batch = args.paper_model, args.paper_image, args.paper_patch, 2
    mem = {}
    for mixer in ("window", "mamba", "bimamba"):
        model, _, images, labels = setup(model_name, img, patch, batch, device, mixer=mixer)
        mem[mixer] = saved_bytes(model, images, labels, reorder.order("row", *model.grid)) / batch
    print(f"\n## bytes autograd saves for backward, --model {model_name}, {img} px, patch {patch}, "
          f"batch {batch}, float32, per image: window ±7 {mem['window'] / 1e6:.1f} MB, mamba "
          f"{mem['mamba'] / 1e6:.1f} MB ({mem['mamba'] / mem['window']:.2f}x), bimamba "
          f"{mem['bimamba'] / 1e6:.1f} MB ({mem['bimamba'] / mem['window']:.2f}x)")


def training_step(model, optimizer, images, labels, perms, dtype):
    """train.py's step on fixed inputs: train.model_step (train on perms[0], score perms[1:],
    cross-entropy, backward, clip 5), then the AdamW step."""
    scaler = torch.amp.GradScaler(images.device.type, enabled=dtype == torch.float16)

    def step():
        train.model_step(model, optimizer, scaler, images, labels, perms, dtype, 5.0)
        scaler.step(optimizer)
        scaler.update()
    return step


def setup(preset, img_size, patch, batch, device, **cfg):
    torch.manual_seed(0)
    model = reorder.ViT(reorder.vit_config(preset, img_size=img_size, patch_size=patch, **cfg))
    optimizer = torch.optim.AdamW(model.to(device).parameters(), lr=1e-4, weight_decay=0.03)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(10, (batch,), device=device)
    return model, optimizer, images, labels


MIXER_CASES = {"window ±7": dict(mixer="window", window=7), "full": dict(window=None),
               "causal": dict(mixer="causal", window=None), "mamba": dict(mixer="mamba"),
               "bimamba": dict(mixer="bimamba")}


def bench_throughput(args, device):
    dtype = train.amp_dtype("auto", device)
    print(f"\n## training throughput: images/s of train.model_step, tiny, batch "
          f"{args.train_batch}, {'autocast ' + str(dtype) if dtype else 'float32'}, median of >= 3 "
          f"alternating steps")
    print(f"{'image':>6} {'patch':>5} {'tokens':>6} | "
          + " ".join(f"{name:>10}" for name in MIXER_CASES) + " | vs window ±7")
    for img_size, patch in args.images:
        fns = {}
        for name, cfg in MIXER_CASES.items():
            model, optimizer, images, labels = setup("tiny", img_size, patch, args.train_batch,
                                                     device, **cfg)
            row = reorder.order("row", *model.grid)
            fns[name] = training_step(model, optimizer, images, labels, [row], dtype)
        sec = median_times(fns, device, 3, budget_s=1.0)
        ips = {name: args.train_batch / s for name, s in sec.items()}
        base = ips["window ±7"]
        print(f"{img_size:>6} {patch:>5} {(img_size // patch) ** 2:>6} | "
              + " ".join(f"{ips[name]:>10.1f}" for name in MIXER_CASES) + " | "
              + " ".join(f"{ips[name] / base:.2f}x" for name in MIXER_CASES))


def saved_bytes(model, images, labels, perm):
    """Bytes autograd keeps for the backward pass of one forward: the distinct storages that
    torch.autograd.graph.saved_tensors_hooks sees packed, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t  # kept alive until backward, so no two saved storages share an address
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images, perm), labels)
    del loss
    return sum(storages.values())


def bench_paper(args, device):
    """The paper's size: memory saved for backward and a training step, per image, per mixer."""
    dtype = train.amp_dtype("auto", device)
    img, patch, batch = args.paper_image, args.paper_patch, args.paper_batch
    print(f"\n## the paper's size: --model {args.paper_model}, {img} px, patch {patch}, "
          f"{(img // patch) ** 2 + 1} tokens, batch {batch}, "
          f"{'autocast ' + str(dtype) if dtype else 'float32'}; per image: MB autograd saves for "
          f"backward, and a training step (median of >= 3 alternating steps)")
    print(f"{'mixer':>10} | {'saved MB':>9} {'x window':>8} | {'step ms':>9} {'x window':>8}")
    mem, fns = {}, {}
    for name in ("window ±7", "causal", "mamba", "bimamba"):
        model, optimizer, images, labels = setup(args.paper_model, img, patch, batch, device,
                                                 **MIXER_CASES[name])
        row = reorder.order("row", *model.grid)
        with train.autocast(device, dtype):
            mem[name] = saved_bytes(model, images, labels, row) / batch
        fns[name] = training_step(model, optimizer, images, labels, [row], dtype)
    sec = median_times(fns, device, 3, budget_s=1.0)
    for name in mem:
        print(f"{name:>10} | {mem[name] / 1e6:>9.1f} {mem[name] / mem['window ±7']:>7.2f}x | "
              f"{sec[name] / batch * 1e3:>9.1f} {sec[name] / sec['window ±7']:>7.2f}x")


def bench_policy(args, device):
    """A learning step against a fixed-order step: the model's part (train on one order, score the
    other K - 1 on the same images) and the policy's (sample, log-prob, REINFORCE, SGD), timed
    alternately. Share = policy / (model + policy)."""
    dtype = train.amp_dtype("auto", device)
    print(f"\n## a --learn-order step: tiny, windowed ±7, batch {args.train_batch}, tau 0.1; "
          f"K orders per step (1 trained, K - 1 scored)")
    print(f"{'image':>6} {'patch':>5} {'K':>2} {'granularity':>11} | {'fixed ms':>9} "
          f"{'model ms':>9} {'x fixed':>7} {'policy ms':>9} {'policy share':>12}")
    for img_size, patch in args.images:
        for k, granularity in ((1, "batch"), (4, "batch"), (4, "image")):
            model, optimizer, images, labels = setup("tiny", img_size, patch, args.train_batch,
                                                     device, window=7)
            policy = reorder.PlackettLuce.from_order(reorder.order("row", *model.grid)).to(device)
            policy_opt = train.policy_optimizer(policy, 0.1)
            gen = torch.Generator().manual_seed(0)  # a CPU one, as train.py's
            per_image = None if granularity == "batch" else args.train_batch
            perms = train.sample_orders(policy, k, 0.1, gen, per_image)

            def policy_step():  # train.py's: sample, rewards of the K orders, baseline, update
                sampled = train.sample_orders(policy, k, 0.1, gen, per_image)
                reward = -torch.rand(sampled.shape[:-1], device=device)
                baseline = reorder.loo_baseline(reward) if k > 1 else reward.mean().item()
                train.policy_update(policy, policy_opt, sampled, 0.1, reward, baseline)
            fixed = reorder.order("row", *model.grid)[None]
            sec = median_times({"fixed": training_step(model, optimizer, images, labels, fixed,
                                                       dtype),
                                "model": training_step(model, optimizer, images, labels, perms,
                                                       dtype),
                                "policy": policy_step}, device, 5, budget_s=1.0)
            share = 100 * sec["policy"] / (sec["model"] + sec["policy"])
            print(f"{img_size:>6} {patch:>5} {k:>2} {granularity:>11} | "
                  f"{sec['fixed'] * 1e3:>9.2f} {sec['model'] * 1e3:>9.2f} "
                  f"{sec['model'] / sec['fixed']:>6.2f}x {sec['policy'] * 1e3:>9.3f} "
                  f"{share:>11.2f}%")


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
    flat = vectors.reshape(-1, vectors.shape[-1])
    codebook_s = best_of(lambda: prior.encode(vectors, prior.fit_codebook(flat, 256)))
    total = {w: best_of(lambda: prior.compressibility(images, 4, workers=w, progress=False))
             for w in (1, 2)}
    print(f"\n## prior.py: {args.prior_n} {source} images, 32 x 32, patch 4, codebook 256, 6 "
          f"orderings x 2 streams, best of 3; codebook + encoding (the same for any workers) "
          f"{codebook_s:.2f} s")
    for w in (1, 2):
        print(f"{w} worker{'s' if w > 1 else ' '}: {total[w]:.2f} s, {args.prior_n / total[w]:.0f} "
              f"images/s (scoring alone {total[w] - codebook_s:.2f} s)")
    print(f"2 workers vs 1: {total[1] / total[2]:.2f}x end to end, "
          f"{(total[1] - codebook_s) / (total[2] - codebook_s):.2f}x on the scoring stage")


def bench_loader(args, device):
    """train.py's loader on an image folder at the paper's size: JPEGs of ImageNet's most common
    size (500 x 375, quality 90, smooth content: about ImageNet's bytes per image), written into a
    temporary folder; decoded, resized to 256, centre-cropped to 224, normalized and flipped
    (data.image_folder, the paper's transform) by train.make_loader's DataLoader."""
    from PIL import Image
    n, size = args.loader_n, (500, 375)
    with tempfile.TemporaryDirectory() as root:
        g = torch.Generator().manual_seed(0)
        kilobytes = 0
        for i in range(n):  # low-frequency colour fields plus grain: natural-looking JPEG sizes
            coarse = torch.rand(3, 12, 16, generator=g)
            field = F.interpolate(coarse[None], size=size[::-1], mode="bicubic")[0]
            pixels = (field + 0.08 * torch.randn(field.shape, generator=g)).clamp(0, 1)
            folder = os.path.join(root, "train", f"class{i % 2}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{i}.jpg")
            Image.fromarray((pixels.permute(1, 2, 0) * 255).byte().numpy()).save(path, quality=90)
            kilobytes += os.path.getsize(path) / 1024
        dataset = data.build_dataset("folder", root, "train", 224, augment=True)
        print(f"\n## loader: {n} JPEGs of {size[0]} x {size[1]} ({kilobytes / n:.0f} KB each), "
              f"decode + resize 256 + crop 224 + normalize + flip, batch {args.loader_batch}; "
              f"images/s after the first batch (worker start-up apart)")
        for workers in sorted({0, 2, os.cpu_count() or 1}):
            flags = argparse.Namespace(workers=workers, batch_size=args.loader_batch, seed=0,
                                        data="folder")
            t0 = time.perf_counter()
            batches = iter(train.make_loader(dataset, flags, device))
            next(batches)
            t1 = time.perf_counter()
            images = sum(len(batch[1]) for batch in batches)
            rate = images / (time.perf_counter() - t1)
            print(f"workers {workers:>2}: {rate:>7.1f} images/s ({rate / max(workers, 1):.1f} per "
                  f"worker), first batch after {t1 - t0:.2f} s")


def bench_resume(args, device):
    import zipfile
    ckpt = {"model": {f"w{i}": torch.randn(1024, 256) for i in range(args.ckpt_mib)}}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "last.pt")
        torch.save(ckpt, path)
        times = {"torch.load": [], "CRC-32 (zipfile)": [], "finite (float64 sums)": []}
        for _ in range(3):
            for name, fn in (("torch.load", lambda: torch.load(path, weights_only=True)),
                             ("CRC-32 (zipfile)", lambda: zipfile.ZipFile(path).testzip()),
                             ("finite (float64 sums)", lambda: [t.sum(dtype=torch.float64)
                                                                for _, t in train.tensors(ckpt)])):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    load = min(times["torch.load"])
    print(f"\n## --resume's checks of a {args.ckpt_mib} MiB last.pt, best of 3")
    for name, t in times.items():
        print(f"{name:<22} {min(t):.2f} s ({min(t) / load:.2f}x torch.load)")


def bench_memory(args, device):
    """train.check_memory's coefficients against what they stand for: bytes autograd saves for the
    backward pass per patch, hidden unit and layer, per mixer (estimate 16); bytes per patch of K
    sampled orders, drawn and scored as a learning step does (estimate 48; resident memory)."""
    print("\n## memory: train.check_memory's coefficients, measured (batch 32, 8 x 8 patches)")
    images, labels = torch.randn(32, 1, 32, 32, device=device), torch.zeros(32, dtype=torch.long,
                                                                          device=device)
    for mixer in reorder.MIXERS:
        cfg = reorder.vit_config("tiny", img_size=32, patch_size=4, in_chans=1, dim=64, depth=2,
                                 heads=2, mixer=mixer)
        saved = saved_bytes(reorder.ViT(cfg).to(device), images, labels, None)
        print(f"{mixer:<8} {saved / (32 * 64 * 4 * cfg.dim * cfg.depth):5.1f} bytes a patch, "
              f"hidden unit and layer (estimate 16)")
    for k, n in [(100000, 64), (20000, 256)]:  # in a fresh process: its high-water mark
        code = (f"import torch, reorder, train, bench; p = reorder.PlackettLuce.from_order("
                f"torch.arange({n})); b = bench.high_water_bytes(); o = train.sample_orders(p, {k}"
                f", 0.1, torch.Generator()); p.log_prob(o, 0.1, check=False).sum().backward(); "
                f"print(bench.high_water_bytes() - b)")
        peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                  env={**os.environ, "PYTHONPATH": os.pardir}).stdout)
        print(f"{k} orders of {n} patches: {peak / (k * n):5.1f} bytes a patch (estimate 48)")


SECTIONS = {"attention": bench_attention, "scan": bench_scan, "recurrence": bench_recurrence,
            "mamba": bench_mamba,
            "faults": bench_faults, "throughput": bench_throughput, "policy": bench_policy,
            "prior": bench_prior, "loader": bench_loader, "paper": bench_paper,
            "resume": bench_resume, "memory": bench_memory}
FULL = dict(attention_sizes=[(197, 7), (1024, 64), (4096, 64), (16384, 64)],
            layer_sizes=[196, 1024, 4096], layer_long=[16384],
            rec_sizes=[(1, 197), (1, 1024), (1, 4096), (8, 197), (8, 1024), (64, 197)],
            floor_sizes=[(256, 197, 64), (128, 50, 16), (8, 197, 192)],
            step_sizes={"196 tokens": (28, 2, 64, 4, 64, 7), "49 tokens": (28, 4, 16, 2, 32, 2)},
            fault_attention=[4096, 16384], fault_scan=[1024, 4096, 16384],
            images=[(32, 4), (224, 16)], paper_model="base", paper_image=224, paper_patch=16,
            paper_batch=2, loader_n=512, loader_batch=64, ckpt_mib=1024)
TINY = dict(attention_sizes=[(33, 3), (64, 4)], layer_sizes=[16, 36], layer_long=[],
            rec_sizes=[(1, 8), (2, 32)], floor_sizes=[(8, 9, 4)],
            step_sizes={"16 tokens": (16, 4, 16, 1, 2, 2)}, fault_attention=[64, 256],
            fault_scan=[16, 64],
            images=[(16, 4)], dim=16, heads=2, repeats=1, train_batch=2, prior_n=40,
            paper_model="tiny", paper_image=32, paper_patch=8, paper_batch=1, loader_n=12,
            loader_batch=4, ckpt_mib=4)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--batch", type=int, default=4, help="attention: batch")
    a("--dim", type=int, default=192, help="attention, scan: width")
    a("--heads", type=int, default=3, help="attention: heads")
    a("--repeats", type=int, default=5, help="attention, scan: at least this many runs")
    a("--dense-max", type=int, default=4096, help="attention: largest N at which dense is timed")
    a("--train-batch", type=int, default=None,
      help="throughput, policy: batch (32 on CPU, 128 on CUDA)")
    a("--prior-n", type=int, default=1000, help="prior: images")
    a("--tiny", action="store_true", help="every section at tiny sizes, to check that it runs")
    a("--peak", nargs=3, metavar=("N", "WINDOW", "KIND"), help=argparse.SUPPRESS)
    a("--time", nargs=3, metavar=("N", "WINDOW", "KIND"), help=argparse.SUPPRESS)
    a("--keep", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    vars(args).update(TINY if args.tiny else {k: v for k, v in FULL.items()})
    device = torch.device(args.device)
    if args.time:  # a fresh process: glibc's defaults, or keep_freed_memory() before anything
        if args.keep:
            data.keep_freed_memory()
        n, window, kind = args.time
        fn = case_fn(kind, int(n), None if window == "None" else int(window), args, device)[0]
        print(median_times({kind: fn}, device, args.repeats)[kind])
        return
    if args.peak:
        n, window, kind = args.peak
        print(peak_bytes(int(n), None if window == "None" else int(window), kind, args, device))
        return
    data.keep_freed_memory()  # as train.py does; the faults section measures it
    sections = args.only.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from "
                 f"{', '.join(SECTIONS)}")
    args.train_batch = args.train_batch or (128 if device.type == "cuda" else 32)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{os.cpu_count()} CPU cores")
    print(f"# device {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for section in sections:
        SECTIONS[section](args, device)


if __name__ == "__main__":
    main()
