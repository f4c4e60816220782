"""The plateau comparison (tests/sweep.py's groups plateau and plateau-reorder): its tables and
its picture, which `python tests/sweep.py --report` writes, and the same comparison at a
paper-like scale on one GPU inside a fixed wall-clock budget: Fashion-MNIST upscaled to 112 px,
patch 8 (14 x 14 = 196 patches, the paper's grid), width 192, depth 6; fixed row / column /
spiral, REOrder from spiral (the paper's worst for both mixers) at the paper's proportions (15%
fixed, 30% learning, 55% fine-tuning) and its frozen-policy control.

    python tests/plateau.py --root data/fashion-mnist --out $OUT/gpu      # one GPU, < 8 minutes
    python tests/plateau.py --tiny --out runs/gpu-tiny/table              # CPU dry run, ~4 min

Runs go `--parallel` at a time on the one device (small models are launch-bound, so several
processes share it well), in order of importance: seed 0 of every cell first. At `--budget-s`
every run still going is stopped; it stays in the table with the epochs it finished, marked
partial, and out of the tests. A run that fails is listed as failed and the rest go on. The table
(results.csv, results.md: every run, then the plateau tables over the finished runs) goes to
--out and is printed at the end; the runs themselves (checkpoints, logs) go to --runs.
"""
import argparse
import csv
import math
import os
import shutil
import statistics
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
        for job in sweep.runs({"plateau", "plateau-reorder"}, args.runs, [seed],
                              args.mixers.split(","), sweep.PLATEAU_ORDERS, root=args.root,
                              starts=dict.fromkeys(args.mixers.split(","), "spiral")):
            extra = curriculum if job[0] != "plateau-fixed" else {}
            jobs.append(job[:4] + (sweep.set_flags(job[4], **size, **extra)
                                   + ["--device", args.device],))
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the table (results.csv, .md)")
    ap.add_argument("--runs", default=None, help="folder for the run folders (checkpoints); "
                    "default runs/gpu, runs/gpu-tiny with --tiny")
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
    args.runs = args.runs or ("runs/gpu-tiny" if args.tiny else "runs/gpu")
    parallel = args.parallel or (8 if args.device == "cuda" else 1)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.runs, exist_ok=True)
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
    rows = []
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
        writer = csv.DictWriter(f, ["group", "mixer", "order", "seed", "status", "epochs",
                                    "val_top1", "s_per_epoch"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{len(finished)} of {len(jobs)} runs finished in {wall:.0f} s.", "",
             "| run | mixer | order | seed | status | epochs | val top-1 | s / epoch |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['mixer']} | {r['order']} | {r['seed']} | {r['status']} | "
              f"{r['epochs']} | {r['val_top1']} | {r['s_per_epoch']} |" for r in rows]
    lines += tables(finished)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def tables(rows):
    """The plateau budget's tables: every cell with its last-20% movement, the order effect of
    the fixed orders, and REOrder against its start and against its frozen-policy control."""
    sel = [r for r in rows if r["group"].startswith("plateau-")]
    mixers = [m for m in dict.fromkeys(r["mixer"] for r in sel)]
    if not sel:
        return []
    lines = ["", "Plateau budget: final val top-1 (%), mean ± std over seeds; over the last 20% "
             "of epochs, change = val top-1 at the end minus at their start, trend = the same "
             "read off a straight line fitted through them (each: mean over seeds, and the "
             "largest |value|), range = max − min (largest over seeds); train top-1 at the end.",
             "", "| mixer | run | val top-1 (n) | change | max abs change | trend | max abs trend "
             "| max range | train top-1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in mixers:
        for group in ("plateau-fixed", "plateau-reorder", "plateau-frozen"):
            for o in (o for o in sweep.reorder.ORDERS if sweep.table(sel, group, m).get(o)):
                c = [r for r in sel if (r["group"], r["mixer"], r["order"]) == (group, m, o)]
                kind = {"plateau-fixed": "fixed", "plateau-reorder": "REOrder from",
                        "plateau-frozen": "frozen policy from"}[group]
                change = [r["last20_change"] for r in c]
                trend = [r["last20_trend"] for r in c]
                top1 = sweep.mean_std([r["val_top1"] for r in c])
                lines.append(
                    f"| {m} | {kind} {o} | {top1} (n={len(c)}) | "
                    f"{statistics.mean(change):+.2f} | {max(map(abs, change)):.2f} | "
                    f"{statistics.mean(trend):+.2f} | {max(map(abs, trend)):.2f} | "
                    f"{max(r['last20_range'] for r in c):.2f} | "
                    f"{statistics.mean(r['train_top1'] for r in c):.2f} |")
    lines += ["", "Fixed orders at the plateau budget, best to worst (mean over the seeds that "
              "ran every order); p = within-seed permutation test; MDE = 2.8 × noise × "
              "√(2 / seeds).", "",
              "| mixer | seeds | ranking | spread | noise | p | MDE |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for m in mixers:
        cells = sweep.table(sel, "plateau-fixed", m)
        blocks = sweep.complete_blocks(cells)
        if len(blocks) >= 2 and len(cells) >= 2:
            spread, noise, p = sweep.order_effect(blocks)
            means = dict(zip(sorted(cells), (statistics.mean(c) for c in zip(*blocks))))
            rank = " > ".join(f"{o} {v:.2f}" for o, v in sorted(means.items(), key=lambda x: -x[1]))
            lines.append(f"| {m} | {len(blocks)} | {rank} | {spread:.2f} | {noise:.2f} | "
                         f"{sweep.p_text(p)} | {2.8 * noise * math.sqrt(2 / len(blocks)):.2f} |")
    lines += ["", "REOrder at the paper's proportions, paired by seed: mean difference, sign-flip "
              "p (exact; with n pairs it cannot go below 2 / 2^n), pairs above 0, and the MDE of "
              "a paired difference (2.8 × std of the differences / √n).", "",
              "| mixer | comparison | difference | p | above 0 | MDE |",
              "|---|---|---:|---:|---:|---:|"]
    for m, start in dict.fromkeys((r["mixer"], r["order"]) for r in sel
                                  if r["group"] == "plateau-reorder"):
        for a, b in (("reorder", "fixed"), ("reorder", "frozen"), ("frozen", "fixed")):
            x, y = (sweep.table(sel, f"plateau-{g}", m).get(start, {}) for g in (a, b))
            d = [x[s] - y[s] for s in sorted(set(x) & set(y))]
            if d:
                mde = 2.8 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
                name = {"reorder": "REOrder", "fixed": f"fixed {start}", "frozen": "frozen"}
                p = sweep.p_text(sweep.sign_flip_test(d))
                lines.append(f"| {m} | {name[a]} − {name[b]} | {statistics.mean(d):+.2f} | {p} | "
                             f"{sum(v > 0 for v in d)} of {len(d)} | {mde:.2f} |")
    return lines


def draw_curves(rows, path):
    """One PNG: a panel per mixer of the plateau budget, val top-1 per epoch, mean over seeds,
    a line per fixed order, REOrder (thick) and its frozen-policy control (thin) in black/grey."""
    from PIL import Image, ImageDraw
    sel = [r for r in rows if r["group"].startswith("plateau-")]
    mixers = list(dict.fromkeys(r["mixer"] for r in sel))
    lines = {}
    for r in sel:
        lines.setdefault((r["mixer"], r["group"], r["order"]), []).append(r["curve"])
    curves = {k: [statistics.mean(v) for v in zip(*c)] for k, c in lines.items()}
    values = [v for c in curves.values() for v in c[len(c) // 5:]]
    lo, hi = 5 * math.floor(min(values) / 5), 5 * math.ceil(max(values) / 5)
    pw, ph, top, left = 360, 280, 40, 46
    sheet = Image.new("RGB", (len(mixers) * (pw + 20) + left, ph + top + 70), "white")
    pen = ImageDraw.Draw(sheet)
    colours = {"row": (31, 119, 180), "column": (44, 160, 44), "hilbert": (148, 103, 189),
               "spiral": (214, 39, 40), "diagonal": (140, 86, 75), "snake": (227, 119, 194)}
    for k, m in enumerate(mixers):
        x0 = left + k * (pw + 20)
        epochs = max(len(c) for (mm, _, _), c in curves.items() if mm == m)
        pen.rectangle([x0, top, x0 + pw, top + ph], outline="black")
        pen.text((x0 + 8, top - 18), f"{m}: val top-1 (%) per epoch", fill="black")
        for v in range(lo, hi + 1, 5):
            y = top + ph - (v - lo) / (hi - lo) * ph
            pen.line([(x0, y), (x0 + pw, y)], fill=(230, 230, 230))
            pen.text((x0 - 22 if k == 0 else x0 + 2, y - 6), f"{v}", fill="black")
        x20 = x0 + 0.8 * (epochs - 1) / max(1, epochs - 1) * pw
        pen.line([(x20, top), (x20, top + ph)], fill=(200, 200, 200))  # the last 20% of epochs
        for (mm, group, order), c in curves.items():
            if mm != m:
                continue
            pts = [(x0 + i / max(1, epochs - 1) * pw,
                    top + ph - (min(max(v, lo), hi) - lo) / (hi - lo) * ph)
                   for i, v in enumerate(c)]
            colour = {"plateau-reorder": (0, 0, 0), "plateau-frozen": (150, 150, 150)}.get(
                group, colours[order])
            pen.line(pts, fill=colour, width=3 if group == "plateau-reorder" else 1 + (
                group == "plateau-fixed"))
        pen.text((x0, top + ph + 4), f"epoch 1 .. {epochs}; grey line: start of the last 20%",
                 fill="black")
    legend = ("mean over seeds; fixed orders in colour; black (thick) = REOrder from the worst, "
              "grey = its frozen-policy control")
    pen.text((left, top + ph + 24), legend, fill="black")
    x = left
    for o, c in colours.items():
        pen.rectangle([x, top + ph + 44, x + 30, top + ph + 50], fill=c)
        pen.text((x + 34, top + ph + 40), o, fill="black")
        x += 90
    sheet.save(path, format="PNG", optimize=True)


if __name__ == "__main__":
    main()
