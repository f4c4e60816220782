"""The GPU check: every mixer on a CUDA device against the CPU, under autocast, compiled, and one
tiny --learn-order epoch of train.py with AMP. A script, not a test (pytest does not collect it).

    python tests/gpu_check.py                 # on a CUDA device; a table, row by row; exit 1 on a FAIL
    python tests/gpu_check.py --device cpu    # a dry run of the same code on the CPU
    python tests/gpu_check.py --paper-scale   # the paper-scale table instead (about 3 minutes)
    python tests/gpu_check.py --paper-scale --device cpu   # its dry run, at a tiny size

Rows: forward + backward of a small ViT (width 96, depth 2, 64 patches, batch 8, a random order
per image) for each mixer, in float32 and under bf16 / fp16 autocast, against the same model in
float32 on the CPU: the largest difference of the logits relative to the largest CPU logit, and
the norm of the difference of all gradients relative to the norm of the CPU gradients. Then
torch.compile against eager on the device, the policy's samples against the CPU's, and train.main
for one epoch of every phase of the curriculum with --amp and --compile on synthetic data, per
mixer.

--paper-scale: for window ±7, causal, mamba and bimamba at the paper's size (ViT-Base, 224 px,
patch 16, 196 patches), bf16 autocast where the GPU has it, eager: the largest power-of-two batch
up to 256 whose training step fits, images/s of a fixed-order training step (train.model_step,
then AdamW), of a learning step (K = 4 orders per image: one trained, three scored, then the
policy's REINFORCE step) and of validation (no-grad forward), the peak memory, and what they
project for one ImageNet-1K epoch (1,281,167 training and 50,000 validation images) and for the
paper's 100-epoch curriculum (15 fixed, 30 learning, 55 fine-tuning, validation every epoch).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import reorder  # noqa: E402
import train  # noqa: E402

MIXERS = {"window ±2": dict(mixer="window", window=2), "full": dict(window=None),
          "causal": dict(mixer="causal", window=None), "causal ±2": dict(mixer="causal", window=2),
          "mamba": dict(mixer="mamba"), "bimamba": dict(mixer="bimamba")}
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


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


class Rows(list):
    """The table's rows, each printed as it comes: a run cut short still shows what it checked."""

    def append(self, row):
        super().append(row)
        print(f"| {row[0]} | {row[1]} | {'ok' if row[2] else 'FAIL'} |", flush=True)


def check_mixers(device, rows):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(10, (8,), generator=g)
    perm = torch.stack([torch.randperm(64, generator=g) for _ in range(8)])
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda"
                                else [torch.bfloat16])
    for name, cfg in MIXERS.items():
        torch.manual_seed(0)
        cpu_model = reorder.ViT(reorder.vit_config("tiny", dim=96, depth=2, **cfg))
        want_logits, want_grads = forward_backward(cpu_model, images, labels, perm, None)
        model = copy.deepcopy(cpu_model).to(device)
        inputs = [t.to(device) for t in (images, labels, perm)]
        for dtype in dtypes:
            logits, grads = forward_backward(model, *inputs, None if dtype == torch.float32
                                             else dtype)
            err_logits = relative_error(logits, want_logits)
            err_grads = gradient_error(grads, want_grads)
            limit = TOLERANCE[str(dtype).split(".")[1]]
            rows.append((f"{name}: {str(dtype).split('.')[1]} vs CPU", f"logits {err_logits:.1e}, "
                         f"grads {err_grads:.1e} (limit {limit:.0e})",
                         err_logits < limit and err_grads < limit
                         and all(torch.isfinite(v).all() for v in grads.values())))


def check_compile(device, rows):
    g = torch.Generator().manual_seed(0)
    inputs = [t.to(device) for t in (torch.randn(8, 3, 32, 32, generator=g),
                                     torch.randint(10, (8,), generator=g),
                                     torch.stack([torch.randperm(64, generator=g)
                                                  for _ in range(8)]))]
    for name, cfg in MIXERS.items():
        torch.manual_seed(0)
        model = reorder.ViT(reorder.vit_config("tiny", dim=96, depth=2, **cfg)).to(device)
        t0 = time.time()
        compiled = torch.compile(copy.deepcopy(model))
        eager_logits, eager_grads = forward_backward(model, *inputs, None)
        logits, grads = forward_backward(compiled, *inputs, None)
        err = max(relative_error(logits, eager_logits), gradient_error(grads, eager_grads))
        rows.append((f"{name}: torch.compile vs eager", f"{err:.1e} (limit 1e-4), "
                     f"{time.time() - t0:.0f} s", err < 1e-4))


def check_policy(device, rows):
    """The policy's samples come from a CPU generator, so a run samples the same orders on any
    device (and --resume may change --device)."""
    start = reorder.order("hilbert", 8, 8)
    orders = [reorder.PlackettLuce.from_order(start).to(d).sample(
        16, 0.2, torch.Generator().manual_seed(0))[0].cpu() for d in ("cpu", device)]
    rows.append(("policy: samples on the device vs CPU, same CPU generator",
                 "identical" if torch.equal(*orders) else "differ", torch.equal(*orders)))


def check_training(device, rows):
    amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16"
    for name, cfg in MIXERS.items():
        flags = ["--mixer", cfg.get("mixer", "window")]
        if "window" in cfg:
            flags += ["--window", str(cfg["window"]).lower()]
        torch._dynamo.reset()  # each run its own compile budget, as in a process of its own
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            summary = train.main(["--data", "synthetic", "--subset", "512", "--val-subset", "128",
                                  "--batch-size", "64", "--img-size", "32", "--dim", "96",
                                  "--depth", "2", "--heads", "3", "--epochs", "3",
                                  "--lr", "1e-3", "--learn-order", "--policy-lr", "1e-2",
                                  "--amp", amp,
                                  "--device", device.type, "--compile", "--quiet", *flags,
                                  "--out", os.path.join(out, "run")])
            h = summary["history"]
            ok = ([m["phase"] for m in h] == ["fixed", "learn", "finetune"]
                  and all(torch.isfinite(torch.tensor(m["train_loss"])) for m in h))
            rows.append((f"{name}: train.py --learn-order --amp {amp} --compile, 3 epochs",
                         f"loss {h[0]['train_loss']:.3f} -> {h[-1]['train_loss']:.3f}, val "
                         f"top-1 {h[-1]['val_top1']:.1f}, {time.time() - t0:.0f} s", ok))


PAPER_MIXERS = {"window ±7": dict(mixer="window", window=7), "causal": dict(mixer="causal"),
                "mamba": dict(mixer="mamba"), "bimamba": dict(mixer="bimamba")}
IMAGENET = (1_281_167, 50_000)  # training, validation images


def step_rates(model, optimizer, batch, device, dtype, repeats):
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
                                 repeats, budget_s=5.0)
    return {k: batch / s for k, s in seconds.items()}


def paper_scale(device, tiny):
    """The paper-scale table, a row per mixer as it comes (see the module's docstring)."""
    dtype = train.amp_dtype("auto", device)
    size = dict(dim=32, depth=1, heads=2, img_size=32) if tiny else dict(img_size=224)
    largest, repeats = (4, 1) if tiny else (256, 3)
    print(f"| mixer | batch | fixed step img/s | learning step img/s | validation img/s | peak "
          f"memory GB | ImageNet epoch h | 100-epoch curriculum h |\n|---|---:|---:|---:|---:|"
          f"---:|---:|---:|", flush=True)
    for name, cfg in PAPER_MIXERS.items():
        for batch in (largest >> k for k in range(largest.bit_length())):  # 256, 128, ..., 1
            try:  # the largest power-of-two batch whose learning step fits
                torch.manual_seed(0)
                model = reorder.ViT(reorder.vit_config("base", patch_size=16, num_classes=1000,
                                                       **size, **cfg)).to(device)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rates = step_rates(model, optimizer, batch, device, dtype, repeats)
                break
            except torch.OutOfMemoryError:
                pass
            model = optimizer = None  # out of the except clause: its frames are let go
            torch.cuda.empty_cache()
        peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
                if device.type == "cuda" else "n/a")
        fixed_s, learn_s = IMAGENET[0] / rates["fixed"], IMAGENET[0] / rates["learn"]
        val_s = IMAGENET[1] / rates["val"]
        print(f"| {name} | {batch} | {rates['fixed']:.0f} | {rates['learn']:.0f} | "
              f"{rates['val']:.0f} | {peak} | {(fixed_s + val_s) / 3600:.2f} | "
              f"{(70 * fixed_s + 30 * learn_s + 100 * val_s) / 3600:.1f} |", flush=True)
        model = optimizer = None


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--paper-scale", action="store_true", help="the paper-scale table instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device here (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}")
    if args.paper_scale:
        return paper_scale(device, tiny=device.type != "cuda")
    rows = Rows()
    print("| check | result | |\n|---|---|---|")
    check_mixers(device, rows)
    check_policy(device, rows)
    check_compile(device, rows)
    check_training(device, rows)
    print(f"{sum(ok for *_, ok in rows)} of {len(rows)} checks passed")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
