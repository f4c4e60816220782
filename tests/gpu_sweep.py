"""The plateau comparison (tests/sweep.py's plateau groups) at a paper-like scale on one GPU,
inside a fixed wall-clock budget: Fashion-MNIST upscaled to 112 px, patch 8 (14 x 14 = 196
patches, the paper's grid), width 192, depth 6; fixed row / column / spiral, REOrder from spiral
(the paper's worst for both mixers) at the paper's proportions (15% fixed, 30% learning, 55%
fine-tuning) and its frozen-policy control.

    python tests/gpu_sweep.py --root data/fashion-mnist --out $OUT/gpu      # one GPU, < 8 minutes
    python tests/gpu_sweep.py --tiny --out runs/gpu-tiny                    # CPU dry run, ~3 min

Runs go `--parallel` at a time on the one device (small models are launch-bound, so several
processes share it well), in order of importance: seed 0 of every cell first. At `--budget-s`
every run still going is stopped; it stays in the table with the epochs it finished, marked
partial, and out of the tests. A run that fails is listed as failed and the rest go on. The table
(results.csv, results.md: every run, then tests/sweep.py's plateau tables over the finished runs)
goes to --out and is printed at the end.
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402

# batch 64: bimamba keeps a and h of [4 x batch, 197, 192, 16] float32 per layer for its backward
# pass (~0.6 GB each at batch 64), and up to 8 runs share the GPU's memory
GPU = dict(img_size=112, patch=8, dim=192, depth=6, heads=3, subset=2000, val_subset=1000,
           epochs=20, batch_size=64, lr=1e-3, warmup_epochs=1)
TINY = dict(img_size=28, patch=4, dim=16, depth=2, heads=2, subset=512, val_subset=256, epochs=7,
            batch_size=32, lr=3e-3, warmup_epochs=1)


def plan(args):
    """[(group, mixer, order, seed, train.py arguments)], the most important first."""
    size = TINY if args.tiny else GPU
    curriculum = dict(policy_start=round(0.15 * size["epochs"]),
                      policy_epochs=round(0.30 * size["epochs"]))
    jobs = []
    for seed in map(int, args.seeds.split(",")):
        for job in sweep.runs({"plateau", "plateau-reorder"}, args.out, [seed],
                              args.mixers.split(","), sweep.PLATEAU_ORDERS, root=args.root,
                              starts=dict.fromkeys(args.mixers.split(","), "spiral")):
            extra = curriculum if job[0] != "plateau-fixed" else {}
            jobs.append(job[:4] + (sweep.set_flags(job[4], **size, **extra)
                                   + ["--device", args.device],))
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the runs and the table")
    ap.add_argument("--root", default="data/fashion-mnist" if os.path.isdir(
        "data/fashion-mnist") else None, help="Fashion-MNIST's .gz files")
    ap.add_argument("--mixers", default="causal,bimamba", help="(mixers train.py lacks: skipped)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--parallel", type=int, default=None, help="default 8 on cuda, 1 on cpu")
    ap.add_argument("--budget-s", type=float, default=400, help="stop every run after this")
    ap.add_argument("--device", default=None, help="default cuda, cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at a tiny size")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    parallel = args.parallel or (8 if args.device == "cuda" else 1)
    os.makedirs(args.out, exist_ok=True)
    jobs, t0 = plan(args), time.time()
    missing = set(args.mixers.split(",")) - set(sweep.reorder.MIXERS)
    if missing:
        print(f"train.py has no mixer {', '.join(sorted(missing))}: skipped", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if args.device == "cpu" else "2"}
    print(f"{len(jobs)} runs, {parallel} at a time, {args.budget_s:.0f} s budget", flush=True)
    waiting, running, status = list(jobs), {}, {}
    while waiting or running:
        while waiting and len(running) < parallel and time.time() - t0 < args.budget_s:
            job = waiting.pop(0)
            run_dir = sweep.flag(job[4], "--out")
            if len(sweep.history(run_dir)) >= int(sweep.flag(job[4], "--epochs")):
                status[run_dir] = "done"  # finished by an earlier call into the same --out
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            log = open(f"{run_dir}.log", "w")
            running[run_dir] = (subprocess.Popen(
                [sys.executable, "train.py", *job[4]], stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=sweep.ROOT), log, time.time())
        if time.time() - t0 >= args.budget_s:
            for run_dir in [d for d in running if running[d][0].poll() is None]:
                running[run_dir][0].kill()
                status[run_dir] = "stopped"
            waiting = []
        for run_dir, (proc, log, start) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                status.setdefault(run_dir, "done" if proc.returncode == 0 else
                                  f"failed ({proc.returncode})")
                print(f"[{time.time() - t0:5.0f} s] {os.path.basename(run_dir)}: "
                      f"{status[run_dir]}, {time.time() - start:.0f} s", flush=True)
                del running[run_dir]
        time.sleep(1)
    print(report(jobs, status, args.out, time.time() - t0))


def report(jobs, status, out, wall):
    rows, finished = [], []
    for group, mixer, order, seed, args in jobs:
        run_dir, epochs = sweep.flag(args, "--out"), int(sweep.flag(args, "--epochs"))
        h = sweep.history(run_dir)
        state = status.get(run_dir, "not started")
        if state == "done" and len(h) < epochs:
            state = "failed (no metrics)"
        rows.append({"group": group, "mixer": mixer, "order": order, "seed": seed,
                     "status": state if len(h) == epochs or state != "stopped" else "partial",
                     "epochs": f"{len(h)}/{epochs}",
                     "val_top1": round(h[-1]["val_top1"], 2) if h else "",
                     "s_per_epoch": round(sum(e["seconds"] for e in h) / len(h), 1) if h else ""})
    finished = sweep.collect([j for j in jobs if status.get(sweep.flag(j[4], "--out")) == "done"])
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{len(finished)} of {len(jobs)} runs finished in {wall:.0f} s.", "",
             "| run | mixer | order | seed | status | epochs | val top-1 | s / epoch |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['mixer']} | {r['order']} | {r['seed']} | {r['status']} | "
              f"{r['epochs']} | {r['val_top1']} | {r['s_per_epoch']} |" for r in rows]
    lines += sweep.plateau_lines(finished)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
