"""The GPU check: one command that answers this project's GPU questions on one CUDA device inside
a wall-clock budget, its dry run on the CPU, and the command that puts its figures into the docs.
A script, not a test (pytest does not collect it).

    python tests/gpu_check.py --all --out DIR --budget-s 480   # one H100 / H200: < 8 minutes
    python tests/gpu_check.py --all --out DIR --device cpu     # the dry run, tiny sizes, ~1 min
    python tests/gpu_check.py --docs DIR/report.json           # into docs/results.md

The parts, the most decisive first; a row whose estimate (a guess for one H100 / H200) would
overrun --budget-s is skipped with a line saying so:
  correctness  every mixer (a ViT of width 96, depth 2, 64 patches, batch 8, an order per image)
               on the device in float32 and under bf16 / fp16 autocast against float32 on the
               CPU: the largest logit difference over the largest CPU logit, the norm of the
               gradients' difference over theirs; the policy's samples; the Triton scan against
               the torch path on the device, y and its six gradients, float32 and bf16 inputs,
               L = 197, E = 100 (not a multiple of the kernel's block), 4 cores of 4 rows
  speed        the scan's forward + backward, torch path / Triton, at B = 64, L = 197, E = 768
               (target >= 10x); a bimamba training step / a window ±7 one at ViT-Base, bf16,
               batch 64 (target <= 2x)
  paper-scale  window ±7, causal, mamba, bimamba at ViT-Base, 224 px, patch 16, bf16: the largest
               power-of-two batch up to 256 whose learning step fits, images/s of a fixed-order
               step (train.model_step, AdamW), a learning step (K = 4 orders per image, one
               trained, three scored, the policy's REINFORCE step) and validation, the peak
               memory, and one ImageNet-1K epoch (1,281,167 + 50,000 images) and the paper's
               100-epoch curriculum (70 fixed-order epochs, 30 learning, 100 validations)
  compile      train.py --learn-order --granularity image --compile per mixer, 6 epochs (2 per
               phase): dynamo's graph count after each (no new graph after a phase's first
               epoch); then torch.compile against eager (the dry run uses dynamo's eager
               backend: inductor's code generation takes minutes on the CPU)
  evidence     the 196-token comparison of docs/results.md (Fashion-MNIST at 112 px, patch 8,
               width 192, depth 6, 2,000 images, 20 epochs, batch 64): causal and bimamba, fixed
               row, column and spiral, REOrder from spiral at 15 / 30 / 55% and its frozen-policy
               control, seeds 0 and 1; train.py processes, 8 at a time on the one device, seed 0
               of every cell first, sent SIGTERM (a checkpoint) at the budget and resumed by the
               next call (run folders in DIR/runs); then the plateau tables over the finished
               runs (tests/sweep.py's)

DIR/report.json and DIR/report.md are rewritten (atomically) after every row, so a run killed at
any instant keeps what it measured; a second call with the same DIR measures only what is
missing. Exit status 1 if a check failed or missed its target.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

STARTED = time.time()  # --budget-s counts from here, the imports included

# the dry run runs the Triton kernels under Triton's interpreter, which triton reads when it is
# first imported (reorder.py imports it)
if any(a in ("cpu", "--device=cpu") for a in sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import reorder  # noqa: E402
import sweep  # noqa: E402
import test_scan  # noqa: E402
import train  # noqa: E402

RESULTS = os.path.realpath(os.path.join(sweep.ROOT, "docs", "results.md"))
DRY_RUN = "CPU (dry run)"  # the device named in a dry run's report
MIXERS = {"window ±2": dict(mixer="window", window=2), "full": dict(window=None),
          "causal": dict(mixer="causal", window=None), "causal ±2": dict(mixer="causal", window=2),
          "mamba": dict(mixer="mamba"), "bimamba": dict(mixer="bimamba")}
DRY_RUN_MIXERS = ("window ±2", "bimamba")  # the compile part's, on the CPU
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
SCAN_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}  # gradients come back in bf16: 2^-8 each
PAPER_MIXERS = {"window ±7": dict(mixer="window", window=7), "causal": dict(mixer="causal"),
                "mamba": dict(mixer="mamba"), "bimamba": dict(mixer="bimamba")}
IMAGENET = (1_281_167, 50_000)  # training, validation images
# the 196-token comparison (docs/results.md, at a paper-like scale); bimamba keeps a and h of
# [4 x batch, 197, 192, 16] per layer on the torch path: batch 64 lets 8 runs share one GPU
EVIDENCE = dict(img_size=112, patch=8, dim=192, depth=6, heads=3, subset=2000, val_subset=1000,
                epochs=20, batch_size=64, lr=1e-3, warmup_epochs=1)
EVIDENCE_TINY = dict(img_size=28, patch=7, dim=16, depth=2, heads=2, subset=64, val_subset=32,
                     epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1)
# seconds a row takes on one H100 / H200, guessed (from the H200 run of issue 23 where one exists)
ESTIMATE = dict(mixer=10, policy=2, scan=20, speed=40, paper=60, graphs=40, eager=90, evidence=60)
PARTS = {  # name: (what it measures, its table's header)
    "correctness": ("Every mixer on the device against the CPU; the Triton scan against the "
                    "torch path on the device", ["check", "result", ""]),
    "speed": ("Ratios of medians of alternating runs in one process (no target on the CPU)",
              ["check", "result", ""]),
    "paper-scale": ("ViT-Base, 224 px, patch 16 (196 patches), eager, bf16 autocast where the "
                    "device has it", ["mixer", "batch", "fixed step img/s", "learning step img/s",
                                      "validation img/s", "peak memory GB", "ImageNet epoch h",
                                      "100-epoch curriculum h"]),
    "compile": ("train.py --learn-order --granularity image --compile, 6 epochs (2 per phase), "
                "and torch.compile against eager", ["check", "result", ""]),
    "evidence": ("The 196-token comparison: every run, then the plateau tables over the finished "
                 "runs", ["run", "mixer", "order", "seed", "status", "epochs", "val top-1",
                          "s / epoch"]),
}


class Report:
    """DIR/report.json and DIR/report.md: rows by part, keyed by their first cell; each row
    written (atomically) as it is measured; a row marked done is not measured again."""

    def __init__(self, out, device_name, budget_s, argv):
        self.path, self.t0, self.budget_s = os.path.join(out, "report.json"), STARTED, budget_s
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)
        else:
            self.data = {"device": device_name, "torch": torch.__version__, "calls": [],
                         "parts": {p: {"rows": [], "skipped": [], "text": ""} for p in PARTS}}
        self.data["calls"].append({"started": datetime.datetime.now(datetime.timezone.utc)
                                   .strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(argv),
                                   "budget_s": budget_s, "wall_s": 0, "measured": 0})
        for part in self.data["parts"].values():
            part["skipped"] = []  # this call's

    def left(self):
        return self.budget_s - (time.time() - self.t0)

    def row(self, part, key):
        return next((r for r in self.data["parts"][part]["rows"] if r["cells"][0] == key), None)

    def wanted(self, part, key, estimate):
        """Whether to measure row `key` now: not done yet, and its estimate fits the budget."""
        if (self.row(part, key) or {}).get("done"):
            return False
        if self.left() < estimate:
            self.skip(part, f"{key}: skipped, it needs about {estimate:.0f} s and "
                            f"{max(0, self.left()):.0f} s of the budget are left")
            return False
        return True

    def skip(self, part, line):
        print(f"[{time.time() - self.t0:4.0f} s {part}] {line}", flush=True)
        self.data["parts"][part]["skipped"].append(line)
        self.save()

    def add(self, part, cells, ok=None, done=True):
        """A measured row (replacing one with the same key); ok: passed, failed, or no check."""
        rows, row = self.data["parts"][part]["rows"], self.row(part, cells[0])
        new = {"cells": [str(c) for c in cells], "ok": ok, "done": done,
               "call": len(self.data["calls"])}
        rows.insert(rows.index(row) if row else len(rows), new)
        if row:
            rows.remove(row)
        self.data["calls"][-1]["measured"] += 1
        mark = {None: "", True: " | ok", False: " | FAIL"}[ok]
        print(f"[{time.time() - self.t0:4.0f} s {part}] {' | '.join(new['cells'])}{mark}",
              flush=True)
        self.save()

    def save(self):
        self.data["calls"][-1]["wall_s"] = round(time.time() - self.t0)
        for path, text in ((self.path, json.dumps(self.data, indent=1, ensure_ascii=False)),
                           (self.path[:-4] + "md", markdown(self.data))):
            tmp = f"{path}.{os.getpid()}.tmp"  # written whole, then renamed over the old one
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)


def markdown(report, parts=PARTS):
    """report.md: the device and the calls, then a table per part."""
    calls = "; ".join(f"{c['started']}, budget {c['budget_s']:.0f} s, {c['wall_s']} s, "
                      f"{c['measured']} rows measured" for c in report["calls"])
    lines = [f"# tests/gpu_check.py on {report['device']} (torch {report['torch']})", "",
             f"Calls: {calls}."]
    for part in parts:
        lines += ["", f"## {part}", ""] + part_markdown(report, part)
    return "\n".join(lines)


def part_markdown(report, part):
    """A part's table (the last column ok / FAIL where the row checks something), the lines of
    the rows its last call skipped, and its text."""
    got, (what, header) = report["parts"][part], PARTS[part]
    if not got["rows"]:
        return ["Not measured."] + [f"- {line}" for line in got["skipped"]]
    checks = [r["ok"] for r in got["rows"] if r["ok"] is not None]
    numeric = [all(re.fullmatch(r"[\d./]*|n/a", r["cells"][i]) for r in got["rows"])
               for i in range(len(header) - (header[-1] == ""))]  # right-aligned
    lines = [f"{what}.", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---:" if n else "---" for n in numeric] + ["---"] * (
                 header[-1] == "")) + "|"]
    for r in got["rows"]:
        mark = [{None: "", True: "ok", False: "FAIL"}[r["ok"]]] * (header[-1] == "")
        lines.append("| " + " | ".join(r["cells"] + mark) + " |")
    if checks:
        lines += ["", f"{sum(checks)} of {len(checks)} checks passed."]
    lines += [""] * bool(got["skipped"]) + [f"- {line}" for line in got["skipped"]]
    return lines + (["", got["text"]] if got["text"] else [])


# ------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------

def forward_backward(model, images, labels, perm, dtype):
    """(logits, {name: grad}) of one step, in float32 or under autocast to dtype."""
    model.zero_grad(set_to_none=True)
    with train.autocast(images.device, dtype):
        logits = model(images, perm)
    F.cross_entropy(logits.float(), labels).backward()
    return logits.float().cpu(), {n.removeprefix("_orig_mod."): p.grad.float().cpu()
                                  for n, p in model.named_parameters()}  # compiled: _orig_mod.


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def gradient_error(got, want):
    """||got - want|| / ||want|| over all parameters' gradients together."""
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want])
    return (diff.norm() / torch.cat([w.flatten() for w in want.values()]).norm()).item()


def small_inputs(device):
    g = torch.Generator().manual_seed(0)
    return [t.to(device) for t in (torch.randn(8, 3, 32, 32, generator=g),
                                   torch.randint(10, (8,), generator=g),
                                   torch.stack([torch.randperm(64, generator=g)
                                                for _ in range(8)]))]


def correctness(report, device, tiny):
    dtypes = ["float32", "bfloat16"] + ["float16"] * (device.type == "cuda")
    for name, cfg in MIXERS.items():
        todo = [d for d in dtypes if report.wanted("correctness", f"{name}: {d} vs CPU",
                                                   ESTIMATE["mixer"])]
        if not todo:
            continue
        torch.manual_seed(0)
        cpu_model = reorder.ViT(reorder.vit_config("tiny", dim=96, depth=2, **cfg))
        want_logits, want_grads = forward_backward(cpu_model, *small_inputs("cpu"), None)
        model = copy.deepcopy(cpu_model).to(device)
        for dtype in todo:
            logits, grads = forward_backward(model, *small_inputs(device), None
                                             if dtype == "float32" else getattr(torch, dtype))
            err_logits, err_grads = relative_error(logits, want_logits), gradient_error(
                grads, want_grads)
            report.add("correctness", [f"{name}: {dtype} vs CPU", f"logits {err_logits:.1e}, "
                                       f"grads {err_grads:.1e} (limit {TOLERANCE[dtype]:.0e})"],
                       err_logits < TOLERANCE[dtype] and err_grads < TOLERANCE[dtype]
                       and all(torch.isfinite(v).all() for v in grads.values()))
    key = "policy: samples on the device vs CPU, same CPU generator"
    if report.wanted("correctness", key, ESTIMATE["policy"]):
        start = reorder.order("hilbert", 8, 8)
        orders = [reorder.PlackettLuce.from_order(start).to(d).sample(
            16, 0.2, torch.Generator().manual_seed(0))[0].cpu() for d in ("cpu", device)]
        same = torch.equal(*orders)
        report.add("correctness", [key, "identical" if same else "differ"], same)
    R, L, E, S = (8, 20, 40, 4) if tiny else (16, 197, 100, 16)  # 4 cores of R / 4 rows
    for dtype in SCAN_TOLERANCE:
        key = f"Triton scan vs torch path on the device, {dtype} inputs, R {R}, L {L}, E {E}, " \
              f"S {S}, 4 cores"
        if report.wanted("correctness", key, ESTIMATE["scan"]):
            errors = scan_errors(test_scan.scan_inputs(R, L, E, S, 4, getattr(torch, dtype)),
                                 device)
            worst = max(errors, key=errors.get)
            report.add("correctness", [key, f"largest relative difference {errors[worst]:.1e} "
                                            f"({worst}; limit {SCAN_TOLERANCE[dtype]:.0e})"],
                       errors[worst] < SCAN_TOLERANCE[dtype])


def scan_errors(inputs, device):
    """{y, x, dt, A, B, C, D: max |triton - torch| / max |torch|} of the outputs and the six
    gradients, both paths on the device."""
    inputs = [t.detach().to(device).requires_grad_() for t in inputs]
    out = {}
    for backend in ("triton", "torch"):
        y = reorder.selective_scan(*inputs, backend=backend)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        out[backend] = [y, *torch.autograd.grad(y, inputs, grad_y)]
    return {name: relative_error(got.float().cpu(), want.float().cpu())
            for name, got, want in zip(("y", "x", "dt", "A", "B", "C", "D"), *out.values())}


# ------------------------------------------------------------------------------------------------
# 2. speed, 3. paper scale
# ------------------------------------------------------------------------------------------------

def speed(report, device, tiny):
    R, L, E, S = (2, 8, 32, 4) if tiny else (64, 197, 768, 16)
    key = f"scan forward + backward, B {R}, L {L}, E {E}, S {S}, float32: torch path / Triton"
    if report.wanted("speed", key, ESTIMATE["speed"]):
        inputs = [t.detach().to(device).requires_grad_() for t in test_scan.scan_inputs(
            R, L, E, S, None)]

        def scan(backend):
            return lambda: reorder.selective_scan(*inputs, backend=backend).sum().backward()
        s = bench.median_times({b: scan(b) for b in ("torch", "triton")}, device,
                               *((1, 0) if tiny else (3, 2.0)))
        ratio = s["torch"] / s["triton"]
        report.add("speed", [key, f"{s['torch'] * 1e3:.2f} ms / {s['triton'] * 1e3:.2f} ms = "
                                  f"{ratio:.1f}x (target >= 10x)"],
                   # Triton's interpreter on the CPU: no target
                   ratio >= 10 if device.type == "cuda" else None)
    dtype = train.amp_dtype("auto", device)
    batch, img, size = (4, 32, dict(dim=32, depth=1, heads=2)) if tiny else (64, 224, {})
    key = f"training step at ViT-Base, batch {batch}, {dtype or 'float32'}: bimamba / window ±7"
    if report.wanted("speed", key, ESTIMATE["speed"]):
        steps = {}
        for name, cfg in (("window ±7", PAPER_MIXERS["window ±7"]), ("bimamba",
                                                                     PAPER_MIXERS["bimamba"])):
            model, optimizer, images, labels = bench.setup("base", img, 16, batch, device, **size,
                                                           **cfg)
            steps[name] = bench.training_step(model, optimizer, images, labels, reorder.order(
                "row", *model.grid)[None].to(device), dtype)
        s = bench.median_times(steps, device, *((1, 0) if tiny else (3, 5.0)))
        ratio = s["bimamba"] / s["window ±7"]
        report.add("speed", [key, f"{s['bimamba'] * 1e3:.0f} ms / {s['window ±7'] * 1e3:.0f} ms "
                                  f"= {ratio:.2f}x (target <= 2x)"],
                   ratio <= 2 if device.type == "cuda" else None)


def step_rates(model, optimizer, batch, device, dtype, repeats, budget_s):
    """images/s of a fixed-order training step, a learning step with K = 4, validation."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, *[model.cfg.patch_size * g for g in model.grid], device=device)
    labels = torch.randint(10, (batch,), device=device)
    policy = reorder.PlackettLuce.from_order(reorder.order("hilbert", *model.grid)).to(device)
    policy_opt, gen = train.policy_optimizer(policy, 0.01), torch.Generator().manual_seed(0)
    fixed = bench.training_step(model, optimizer, images, labels, policy.mode()[None], dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16, or float32 on the CPU

    def learn():  # train.py's learning step: K orders per image, leave-one-out, REINFORCE
        perms = train.sample_orders(policy, 4, 0.1, gen, batch)  # [4, B, N]
        _, losses, *_ = train.model_step(model, optimizer, scaler, images, labels, perms, dtype,
                                         5.0)
        optimizer.step()
        train.policy_update(policy, policy_opt, perms, 0.1, -losses, reorder.loo_baseline(
            -losses))

    def validate():
        with torch.no_grad(), train.autocast(device, dtype):
            model(images, policy.mode())
    seconds = bench.median_times({"fixed": fixed, "learn": learn, "val": validate}, device,
                                 repeats, budget_s)
    return {k: batch / s for k, s in seconds.items()}


def paper_scale(report, device, tiny):
    """A row per mixer: its largest batch, rates, peak memory and projections."""
    dtype = train.amp_dtype("auto", device)
    size = dict(dim=32, depth=1, heads=2, img_size=32) if tiny else dict(img_size=224)
    largest, repeats, budget_s = (4, 1, 0.2) if tiny else (256, 3, 5.0)
    for name, cfg in PAPER_MIXERS.items():
        if not report.wanted("paper-scale", name, ESTIMATE["paper"]):
            continue
        for batch in (largest >> k for k in range(largest.bit_length())):  # 256, 128, ..., 1
            try:  # the largest power-of-two batch whose learning step fits
                torch.manual_seed(0)
                model = reorder.ViT(reorder.vit_config("base", patch_size=16, num_classes=1000,
                                                       **size, **cfg)).to(device)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rates = step_rates(model, optimizer, batch, device, dtype, repeats, budget_s)
                break
            except torch.OutOfMemoryError:
                pass
            model = optimizer = None  # out of the except clause: its frames are let go
            torch.cuda.empty_cache()
        peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
                if device.type == "cuda" else "n/a")
        fixed_s, learn_s = IMAGENET[0] / rates["fixed"], IMAGENET[0] / rates["learn"]
        val_s = IMAGENET[1] / rates["val"]
        report.add("paper-scale", [name, batch, f"{rates['fixed']:.0f}", f"{rates['learn']:.0f}",
                                   f"{rates['val']:.0f}", peak, f"{(fixed_s + val_s) / 3600:.2f}",
                                   f"{(70 * fixed_s + 30 * learn_s + 100 * val_s) / 3600:.1f}"])
        model = optimizer = None


# ------------------------------------------------------------------------------------------------
# 4. compile
# ------------------------------------------------------------------------------------------------

def compile_check(report, device, tiny):
    mixers = {m: MIXERS[m] for m in (DRY_RUN_MIXERS if tiny else MIXERS)}
    size = (["--subset", "64", "--val-subset", "32", "--batch-size", "16", "--img-size", "16",
             "--dim", "16", "--depth", "1", "--heads", "2"] if tiny else
            ["--subset", "512", "--val-subset", "128", "--batch-size", "64", "--img-size", "32",
             "--dim", "96", "--depth", "2", "--heads", "3"])

    def backend():  # on the CPU, dynamo's graphs without inductor's code generation (minutes)
        return (mock.patch.object(torch, "compile", functools.partial(torch.compile,
                                                                      backend="eager"))
                if device.type == "cpu" else contextlib.nullcontext())
    for name, cfg in mixers.items():
        key = f"{name}: graphs after each epoch"
        if not report.wanted("compile", key, ESTIMATE["graphs"]):
            continue
        flags = ["--mixer", cfg.get("mixer", "window")]
        flags += ["--window", str(cfg["window"]).lower()] if "window" in cfg else []
        torch._dynamo.reset()  # each run its own compile budget, as in a process of its own
        torch._dynamo.utils.counters.clear()
        graphs, record = [], train.epoch_record
        with tempfile.TemporaryDirectory() as out, backend(), mock.patch.object(
                train, "epoch_record", lambda *a: (graphs.append(
                    torch._dynamo.utils.counters["stats"]["unique_graphs"]), record(*a))[1]):
            t0 = time.time()
            h = train.main(["--data", "synthetic", *size, "--epochs", "6", "--policy-start", "2",
                            "--policy-epochs", "2", "--learn-order", "--granularity", "image",
                            "--lr", "1e-3", "--policy-lr", "1e-2", "--device", device.type,
                            "--compile", "--quiet", *flags, "--out", os.path.join(out, "run")]
                           )["history"]
        phases = [m["phase"] for m in h]
        again = [i for i in range(1, len(h)) if phases[i] == phases[i - 1]
                 and graphs[i] != graphs[i - 1]]  # a graph built after a phase's first epoch
        report.add("compile", [key, ", ".join(f"{p} {g}" for p, g in zip(phases, graphs))
                               + f"; loss {h[0]['train_loss']:.3f} -> {h[-1]['train_loss']:.3f}"
                               f", {time.time() - t0:.0f} s"],
                   phases == ["fixed"] * 2 + ["learn"] * 2 + ["finetune"] * 2 and not again
                   and all(math.isfinite(m["train_loss"]) for m in h))
    for name, cfg in mixers.items():
        key = f"{name}: torch.compile vs eager"
        if not report.wanted("compile", key, ESTIMATE["eager"]):
            continue
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = reorder.ViT(reorder.vit_config("tiny", dim=96, depth=2, **cfg)).to(device)
        t0 = time.time()
        with backend():
            compiled = torch.compile(copy.deepcopy(model))
        eager_logits, eager_grads = forward_backward(model, *small_inputs(device), None)
        logits, grads = forward_backward(compiled, *small_inputs(device), None)
        err = max(relative_error(logits, eager_logits), gradient_error(grads, eager_grads))
        report.add("compile", [key, f"{err:.1e} (limit 1e-4), {time.time() - t0:.0f} s"],
                   err < 1e-4)


# ------------------------------------------------------------------------------------------------
# 5. the 196-token evidence
# ------------------------------------------------------------------------------------------------

def evidence_jobs(runs, root, tiny):
    """[(group, mixer, order, seed, train.py arguments)], seed 0 of every cell first."""
    size = EVIDENCE_TINY if tiny else EVIDENCE
    curriculum = dict(policy_start=round(0.15 * size["epochs"]),
                      policy_epochs=round(0.30 * size["epochs"]))
    jobs = []
    for seed in (0,) if tiny else (0, 1):
        for job in sweep.runs({"plateau", "plateau-reorder"}, runs, [seed], ["causal", "bimamba"],
                              sweep.PLATEAU_ORDERS, root=root, starts=dict.fromkeys(
                                  ["causal", "bimamba"], "spiral")):  # the paper's worst
            extra = curriculum if job[0] != "plateau-fixed" else {}
            jobs.append(job[:4] + (sweep.set_flags(job[4], **size, **extra),))
    return jobs


def evidence_row(report, job, status):
    run_dir, epochs = sweep.flag(job[4], "--out"), int(sweep.flag(job[4], "--epochs"))
    h = sweep.history(run_dir)
    done = len(h) >= epochs
    report.add("evidence", [os.path.basename(run_dir), job[1], job[2], job[3],
                            "done" if done else status, f"{len(h)}/{epochs}",
                            f"{h[-1]['val_top1']:.1f}" if h else "",
                            f"{sum(e['seconds'] for e in h) / len(h):.1f}" if h else ""],
               done=done)


def evidence(report, device, root, tiny, parallel):
    """train.py runs, `parallel` at a time, until done or the budget (less 30 s to stop them);
    a row per run as it ends; then the plateau tables over the finished runs."""
    runs = os.path.join(os.path.dirname(report.path), "runs")
    jobs = evidence_jobs(runs, root, tiny)
    waiting = [j for j in jobs if not (report.row("evidence", os.path.basename(
        sweep.flag(j[4], "--out"))) or {}).get("done")]
    if waiting and report.left() < ESTIMATE["evidence"] + 30:
        return report.skip("evidence", f"{len(waiting)} runs: skipped, they need at least "
                                       f"{ESTIMATE['evidence'] + 30} s of the budget and "
                                       f"{max(0, report.left()):.0f} s are left")
    os.makedirs(runs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if device.type == "cpu" else "2"}
    running, stopping = {}, None
    while running or (waiting and stopping is None):
        while waiting and len(running) < parallel and stopping is None:
            job = waiting.pop(0)
            run_dir = sweep.flag(job[4], "--out")
            if len(sweep.history(run_dir)) >= int(sweep.flag(job[4], "--epochs")):
                evidence_row(report, job, "done")  # finished before the last call was stopped
                continue
            resume = ["--resume"] if os.path.exists(os.path.join(run_dir, "last.pt")) else []
            if not resume:  # died before its first checkpoint: start again
                shutil.rmtree(run_dir, ignore_errors=True)
            log = open(f"{run_dir}.log", "a")
            running[run_dir] = (subprocess.Popen(
                [sys.executable, "train.py", *job[4], "--device", device.type, *resume],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=sweep.ROOT), log, job)
        if stopping is None and report.left() < 30:
            stopping = time.time()  # SIGTERM: each run checkpoints the step under way and exits
            for proc, _, _ in running.values():
                proc.send_signal(signal.SIGTERM)
        for run_dir, (proc, log, job) in list(running.items()):
            if stopping is not None and time.time() - stopping > 20:
                proc.kill()  # --resume continues from its last checkpoint
            if proc.poll() is not None:
                log.close()
                del running[run_dir]
                evidence_row(report, job, "stopped" if stopping else f"failed ({proc.returncode})")
        time.sleep(0.2)
    for job in waiting:
        evidence_row(report, job, "not started")
    finished = sweep.collect([j for j in jobs if (report.row("evidence", os.path.basename(
        sweep.flag(j[4], "--out"))) or {}).get("done")])
    report.data["parts"]["evidence"]["text"] = "\n".join(sweep.plateau_tables(finished)).strip()
    report.save()


# ------------------------------------------------------------------------------------------------
# --docs: report.json into docs/results.md
# ------------------------------------------------------------------------------------------------

def docs(report_path, results_path):
    """Each part's block of results.md, between `<!-- gpu_check: PART -->` and
    `<!-- gpu_check: end -->`, replaced by the part's table from report.json with the device
    named; a part that measured nothing keeps its block. Returns the new text."""
    with open(report_path) as f:
        try:
            report = json.load(f)
        except ValueError as e:
            raise ValueError(f"{report_path} is not a report.json: {e}")
    if report["device"] == DRY_RUN and os.path.realpath(results_path) == RESULTS:
        raise ValueError(f"{report_path} is a dry run's: its numbers say nothing about a GPU")
    with open(results_path) as f:
        text = f.read()
    calls = report["calls"]
    for part in PARTS:  # markers are whole lines
        begin, end = f"\n<!-- gpu_check: {part} -->\n", "\n<!-- gpu_check: end -->\n"
        if text.count(begin) != 1 or end not in text.split(begin)[-1]:
            raise ValueError(f"{results_path} needs one line {begin.strip()} and a line "
                             f"{end.strip()} after it")
        if not report["parts"][part]["rows"]:
            continue
        block = [f"Measured by `python tests/gpu_check.py --all` on **{report['device']}** "
                 f"(torch {report['torch']}), {len(calls)} call(s) from {calls[0]['started']}, "
                 f"{sum(c['wall_s'] for c in calls)} s in all:", ""] + part_markdown(report, part)
        head, rest = text.split(begin)
        text = head + begin + "\n".join(block) + end + rest.split(end, 1)[1]
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="run every part into --out")
    mode.add_argument("--docs", metavar="REPORT_JSON", help="write REPORT_JSON's figures into "
                                                            "--results' GPU sections")
    ap.add_argument("--out", metavar="DIR", help="report.json, report.md, runs/ (with --all)")
    ap.add_argument("--budget-s", type=float, default=480, help="stop within this many seconds")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the dry run, at tiny sizes")
    ap.add_argument("--root", default="data/fashion-mnist" if os.path.isdir(os.path.join(
        sweep.ROOT, "data/fashion-mnist")) else None, help="Fashion-MNIST's .gz files (evidence)")
    ap.add_argument("--parallel", type=int, help="evidence runs at a time (default 8; cpu 2)")
    ap.add_argument("--results", default=RESULTS, help="the docs page for --docs")
    args = ap.parse_args(argv)
    if args.docs:
        try:
            text = docs(args.docs, args.results)
        except (OSError, ValueError, KeyError) as e:
            print(f"gpu_check.py: error: {e}", file=sys.stderr)
            return 2
        with open(args.results + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.results + ".tmp", args.results)
        return print(f"wrote {args.results}")
    device = torch.device(args.device)
    if args.out is None or (device.type == "cuda" and not torch.cuda.is_available()):
        print("gpu_check.py: error: " + ("--all needs --out DIR" if args.out is None else
                                         "no CUDA device here (--device cpu: the dry run)"),
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else DRY_RUN
    try:
        os.makedirs(args.out, exist_ok=True)
        report = Report(args.out, name, args.budget_s,
                        ["tests/gpu_check.py"] + (argv or sys.argv[1:]))
    except (OSError, ValueError, KeyError) as e:  # a file as --out, a damaged report.json
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    if report.data["device"] != name:
        print(f"gpu_check.py: error: {report.path} was measured on {report.data['device']}, "
              f"not {name}: give another --out", file=sys.stderr)
        return 2
    print(f"# {name}, torch {torch.__version__}, budget {args.budget_s:.0f} s", flush=True)
    tiny = device.type == "cpu"
    correctness(report, device, tiny)
    speed(report, device, tiny)
    paper_scale(report, device, tiny)
    compile_check(report, device, tiny)
    evidence(report, device, args.root, tiny, args.parallel or (2 if tiny else 8))
    report.save()
    rows = [r for p in report.data["parts"].values() for r in p["rows"]]
    print(f"{report.data['calls'][-1]['measured']} rows measured in "
          f"{time.time() - report.t0:.0f} s; {sum(r['ok'] is False for r in rows)} failed; "
          f"{args.out}/report.md")
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
