"""The evidence sweep (README "Results"): does the order matter, and does REOrder help?

    python tests/sweep.py                           # everything, 2 runs at a time, into runs/sweep
    python tests/sweep.py --groups neighbours,pairs # only the known-answer tasks
    python tests/sweep.py --report                  # only rebuild the tables and the picture
    python tests/sweep.py --groups plateau,plateau-reorder --mixers causal,bimamba --jobs 1

Groups (each a set of train.py runs, one thread each; the budgets are FMNIST and TASK below):
  fixed       Fashion-MNIST, each mixer (window, causal, mamba) on each of the six orderings
  control     the same with full attention: order-invariant in exact arithmetic, so its spread
              across orderings is the noise floor
  reorder     --learn-order from each of the six orderings, each mixer
  neighbours  the known-answer task --data neighbours: fixed row and column orders, REOrder from
              row, and the same curriculum with a frozen policy (--policy-lr 0)
  pairs       the known-answer task --data pairs: fixed row and pairing orders, REOrder from row
  plateau     PLATEAU: a budget where val top-1 stops moving; row, column, spiral (--orders) for
              causal and bimamba (--mixers); plateau-reorder: REOrder at the paper's 15/30/55 from
              the worst (PLATEAU_START) and its frozen-policy control (docs/results.md, the plateau;
              the same at 196 patches on a GPU: tests/gpu_check.py --all, its evidence part)
Seeds are blocks: every order of a mixer runs with the same seeds (same initial weights, same
batches), so orders are compared within a seed. A finished run (metrics.jsonl has every epoch) is
not run again and an interrupted one is resumed, so the sweep can be stopped and restarted.
--report writes runs/sweep/results.md and results.csv, figures/results.png and figures/plateau.png.
"""
import argparse
import csv
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import reorder  # noqa: E402

MODEL = ["--dim", "64", "--depth", "4", "--heads", "2"]
MIXERS = {"window": ["--mixer", "window", "--window", "2"], "causal": ["--mixer", "causal"],
          "mamba": ["--mixer", "mamba"]}
CONTROL = ["--mixer", "window", "--window", "none"]
FMNIST = ["--data", "fashion-mnist", "--img-size", "28", "--subset", "6000", "--val-subset",
          "5000", "--epochs", "4", "--batch-size", "32", "--lr", "1e-3", "--warmup-epochs", "1"]
# REOrder on Fashion-MNIST: 1 epoch on the start order, 2 learning it, 1 fine-tuning; gentler
# than on the known-answer tasks (README: what the policy needs): samples move a patch by about
# 3 slots (tau 0.05, not 0.2), and a smaller step, since the orders' rewards differ from batch to
# batch without a direction
REORDER = ["--learn-order", "--policy-start", "1", "--policy-epochs", "2", "--granularity",
           "image", "--policy-lr", "0.03", "--tau-max", "0.05"]
SEEDS = (0, 1, 2)
# the known-answer tasks: 5 epochs on a fixed order; REOrder 2 epochs on random orders, 6
# learning, 1 fine-tuning (15 fixed-epoch equivalents: a learning step scores 4 orders)
TASK = ["--subset", "12000", "--val-subset", "2000", "--batch-size", "128", "--lr", "1e-3",
        "--window", "2"]
TASK_FIXED = ["--epochs", "5"]
TASK_REORDER = ["--epochs", "9", "--learn-order", "--policy-start", "2", "--policy-epochs", "6",
                "--fixed-tau", "100", "--granularity", "image", "--policy-lr", "0.3"]
TASK_SEEDS = (0, 1, 2)
TASK_GRID = reorder.grid_size(32, 4)
# The plateau budget (docs/results.md, the plateau): a smaller model trained until val top-1 stops
# moving; REOrder at the paper's proportions, 15% fixed, 30% learning, 55% fine-tuning
PLATEAU_EPOCHS = 40
PLATEAU = ["--data", "fashion-mnist", "--img-size", "28", "--patch", "4", "--val-subset", "2000",
           "--epochs", str(PLATEAU_EPOCHS), "--batch-size", "32",
           "--lr", "3e-3", "--warmup-epochs", "2"]
# width 32, depth 2, 2,000 images; bimamba (four scans: a step costs ~5x mamba's, ~20x causal's
# here) at width 16 on 1,000 images, to fit the time
PLATEAU_MODEL = {m: ["--dim", "16" if m == "bimamba" else "32", "--depth", "2", "--heads", "2",
                     "--subset", "1000" if m == "bimamba" else "2000"]
                 for m in ("causal", "bimamba", "mamba")}
PLATEAU_REORDER = ["--learn-order", "--policy-start", str(round(0.15 * PLATEAU_EPOCHS)),
                   "--policy-epochs", str(round(0.30 * PLATEAU_EPOCHS)), "--granularity", "image",
                   "--orders-per-step", "4", "--policy-lr", "0.03", "--tau-max", "0.05"]
PLATEAU_ORDERS = ("row", "column", "spiral")  # the paper's two best and its worst (Mamba, TXL)
PLATEAU_MIXERS = ("causal", "bimamba", "mamba")  # REOrder starts from the worst fixed order:
PLATEAU_START = {"causal": "spiral", "bimamba": "column"}  # measured on seeds 0-1, pinned
GROUPS = ("fixed", "control", "reorder", "neighbours", "pairs", "plateau", "plateau-reorder")


def flag(args, name):
    """The value given to `name` in a train.py argument list."""
    return args[args.index(name) + 1]


def set_flags(args, **values):
    """A copy of a train.py argument list with flags' values replaced (policy_lr: --policy-lr)."""
    args = list(args)
    for name, value in values.items():
        args[args.index("--" + name.replace("_", "-")) + 1] = str(value)
    return args


def worst_fixed(out, mixer, orders, root=None):
    """The fixed order with the lowest mean final val top-1 among the finished plateau runs of
    `mixer` in `out`, any seed (spiral, the paper's worst, before any has finished)."""
    done = collect(runs({"plateau"}, out, SEEDS, [mixer], orders, root=root))
    means = {o: statistics.mean(v.values()) for o, v in table(done, "plateau-fixed", mixer).items()}
    return min(means, key=means.get) if means else "spiral"


def runs(groups, out, seeds=SEEDS, mixers=PLATEAU_MIXERS, orders=PLATEAU_ORDERS,
         task_seeds=TASK_SEEDS, root=None, task_size=None, starts=PLATEAU_START):
    """[(group, mixer, order, seed, train.py arguments)] of the chosen groups."""
    jobs = []
    where = ["--root", root] if root else []
    for seed, mixer in itertools.product(seeds, (m for m in mixers if m in reorder.MIXERS)):
        common = PLATEAU + PLATEAU_MODEL[mixer] + where + ["--mixer", mixer, "--seed", str(seed)]
        if "plateau" in groups:
            jobs += [("plateau-fixed", mixer, o, seed, common + ["--order", o]) for o in orders]
        if "plateau-reorder" in groups:
            worst = starts.get(mixer) or worst_fixed(out, mixer, orders, root)
            start = common + ["--order", worst] + PLATEAU_REORDER
            jobs += [("plateau-reorder", mixer, worst, seed, start),
                     ("plateau-frozen", mixer, worst, seed, set_flags(start, policy_lr=0))]
    for seed, name in itertools.product(seeds, reorder.ORDERS):
        common = FMNIST + MODEL + ["--order", name, "--seed", str(seed)]
        for mixer, flags in MIXERS.items():
            if "fixed" in groups:
                jobs.append(("fixed", mixer, name, seed, common + flags))
            if "reorder" in groups:
                jobs.append(("reorder", mixer, name, seed, common + flags + REORDER))
        if "control" in groups:
            jobs.append(("control", "full", name, seed, common + CONTROL))
    for seed in task_seeds:
        task = set_flags(MODEL + TASK, **(task_size or {})) + ["--seed", str(seed)]
        if "neighbours" in groups:
            task_jobs = [("fixed", "row", TASK_FIXED), ("fixed", "column", TASK_FIXED),
                         ("reorder", "row", TASK_REORDER),
                         ("frozen", "row", TASK_REORDER + ["--policy-lr", "0"])]
            jobs += [(f"neighbours-{kind}", "window", order, seed,
                      ["--data", "neighbours", "--order", order] + task + extra)
                     for kind, order, extra in task_jobs]
        if "pairs" in groups:
            pairing = os.path.join(out, "pair_order.pt")
            task_jobs = [("fixed", "row", "row", TASK_FIXED),
                         ("fixed", "pairing", pairing, TASK_FIXED),
                         ("reorder", "row", "row", TASK_REORDER)]
            jobs += [(f"pairs-{kind}", "window", name, seed,
                      ["--data", "pairs", "--order", order] + task + extra)
                     for kind, name, order, extra in task_jobs]
    return [(g, m, o, s, a + ["--quiet", "--out", os.path.join(out, f"{g}-{m}-{o}-s{s}")])
            for g, m, o, s, a in jobs]


def history(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def launch(job, log):
    group, mixer, order, seed, args = job
    run_dir = flag(args, "--out")
    if len(history(run_dir)) >= int(flag(args, "--epochs")):
        return
    resume = ["--resume"] if os.path.exists(os.path.join(run_dir, "last.pt")) else []
    if not resume and os.path.isdir(run_dir):  # died before its first checkpoint: start again
        for name in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(f"{run_dir}.log", "a") as f:
        code = subprocess.call([sys.executable, "train.py", *args, *resume], stdout=f,
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log(f"{group:18s} {mixer:6s} {order:9s} seed {seed}: exit {code}, {time.time() - t0:.0f} s")


def collect(jobs):
    """One row per finished run: final val top-1, seconds, and for the known-answer tasks where
    the partners sit: their mean slot distance and the share of pairs within ±2 slots."""
    rows = []
    for group, mixer, order, seed, args in jobs:
        run_dir = flag(args, "--out")
        h = history(run_dir)
        if len(h) < int(flag(args, "--epochs")):
            continue
        row = {"group": group, "mixer": mixer, "order": order, "seed": seed,
               "val_top1": round(h[-1]["val_top1"], 2),
               "seconds": round(sum(e["seconds"] for e in h), 1),
               "order_shift": round(h[-1]["order_shift"], 2)}
        last = [e["val_top1"] for e in h[len(h) - max(1, round(0.2 * len(h))) - 1:]]
        x = [i - (len(last) - 1) / 2 for i in range(len(last))]  # a line fitted through them
        trend = sum(a * b for a, b in zip(x, last)) / max(1e-9, sum(a * a for a in x)) * (
            len(last) - 1)
        row.update(train_top1=round(h[-1]["train_top1"], 2),  # the last 20% of epochs:
                   last20_change=round(last[-1] - last[0], 2),  # from its start to the end
                   last20_trend=round(trend, 2), last20_range=round(max(last) - min(last), 2),
                   curve=[e["val_top1"] for e in h])
        if flag(args, "--data") in ("pairs", "neighbours"):
            gap = 1 if flag(args, "--data") == "neighbours" else None
            perm = data.load_order(os.path.join(run_dir, "order.pt"), TASK_GRID[0] * TASK_GRID[1])
            apart = data.pair_gaps(perm, *TASK_GRID, gap)
            row["pair_distance"] = round(apart.mean().item(), 2)
            row["pairs_in_reach"] = round((apart <= 2).float().mean().item(), 3)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Statistics, with the standard library: permutation and sign-flip tests
# --------------------------------------------------------------------------------------------------

def table(rows, group, mixer):
    """{order: {seed: val top-1}} of one group and mixer."""
    cells = {}
    for r in rows:
        if r["group"] == group and r["mixer"] == mixer:
            cells.setdefault(r["order"], {})[r["seed"]] = r["val_top1"]
    return cells


def complete_blocks(cells):
    """[[value of each order] for each seed that has every order]: the blocked design's rows."""
    orders = sorted(cells)
    seeds = set.intersection(*(set(cells[o]) for o in orders)) if orders else set()
    return [[cells[o][s] for o in orders] for s in sorted(seeds)]


def order_effect(blocks, permutations=20000, seed=0):
    """(spread of the order means, residual std of a run, permutation p-value) for rows = seeds,
    columns = orders. The statistic is the variance of the order means; the null hypothesis, that
    the order does not matter, makes the orders exchangeable within each seed, so the p-value is
    the share of within-seed shufflings whose statistic is at least the observed one."""
    n, k = len(blocks), len(blocks[0])

    def variance_of_means(rows):
        return statistics.pvariance([sum(r[j] for r in rows) / n for j in range(k)])
    observed = variance_of_means(blocks)
    rng, hits = random.Random(seed), 0
    for _ in range(permutations):
        hits += variance_of_means([rng.sample(r, k) for r in blocks]) >= observed - 1e-12
    means = [sum(r[j] for r in blocks) / n for j in range(k)]
    seed_means = [sum(r) / k for r in blocks]
    grand = sum(seed_means) / n
    residual = sum((blocks[i][j] - means[j] - seed_means[i] + grand) ** 2
                   for i in range(n) for j in range(k)) / max(1, (n - 1) * (k - 1))
    return max(means) - min(means), math.sqrt(residual), (hits + 1) / (permutations + 1)


def sign_flip_test(diffs, permutations=20000, seed=0):
    """Two-sided p-value of mean(diffs) = 0 for paired differences: exact over all sign flips
    for up to 16 pairs, else sampled."""
    observed, n = abs(sum(diffs)), len(diffs)
    if n <= 16:
        flips = itertools.product((1, -1), repeat=n)
        total = 2 ** n
    else:
        rng = random.Random(seed)
        flips = ([rng.choice((1, -1)) for _ in range(n)] for _ in range(permutations))
        total = permutations
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-9 for signs in flips)
    return hits / total if n <= 16 else (hits + 1) / (total + 1)


def p_text(p):
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def mean_std(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


# --------------------------------------------------------------------------------------------------
# Report: tables, tests, the picture
# --------------------------------------------------------------------------------------------------

def report(rows, out, figure=None, estimators=True):
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        keys = ["group", "mixer", "order", "seed", "val_top1", "seconds", "order_shift",
                "pair_distance", "pairs_in_reach", "train_top1", "last20_change", "last20_trend",
                "last20_range"]
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    mixers = [m for m in list(MIXERS) + ["full"] if any(
        r["mixer"] == m and r["group"] in ("fixed", "reorder", "control") for r in rows)]
    if mixers:
        lines += ["Final val top-1 (%), mean ± std over seeds (n = runs).", "",
                  "| ordering | " + " | ".join(
            f"{m} fixed | {m} REOrder" if m != "full" else "full attention (control)"
            for m in mixers) + " |", "|---|" + "---:|" * sum(1 if m == "full" else 2
                                                             for m in mixers)]
        for name in reorder.ORDERS:
            cells = []
            for m in mixers:
                for group in (("control",) if m == "full" else ("fixed", "reorder")):
                    values = list(table(rows, group, m).get(name, {}).values())
                    cells.append(f"{mean_std(values)} (n={len(values)})" if values else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Is the order effect above noise? Spread = best minus worst order mean; a "
                  "run's noise = residual std after order and seed; p = within-seed permutation "
                  "test of the variance of the order means; MDE = the difference between two "
                  "orders detectable with 80% power at α = 0.05 (2.8 × noise × √(2/seeds)).", "",
                  "| mixer | seeds | spread | noise | p | MDE |", "|---|---:|---:|---:|---:|---:|"]
        for m in mixers:
            for group in (("control",) if m == "full" else ("fixed", "reorder")):
                blocks = complete_blocks(table(rows, group, m))
                if len(blocks) >= 2:
                    spread, noise, p = order_effect(blocks)
                    mde = 2.8 * noise * math.sqrt(2 / len(blocks))
                    label = "full attention (control)" if m == "full" else f"{m}, {group}"
                    lines.append(f"| {label} | {len(blocks)} | {spread:.2f} | {noise:.2f} | "
                                 f"{p_text(p)} | {mde:.2f} |")
        lines += ["", "Does REOrder beat its start (paired by seed), and the best fixed order?",
                  "", "| mixer | REOrder − start | p (sign flips) | above start | REOrder mean | "
                  "best fixed (mean) |", "|---|---:|---:|---:|---:|---:|"]
        for m in (m for m in mixers if m != "full"):
            fixed, learned = table(rows, "fixed", m), table(rows, "reorder", m)
            diffs = [learned[o][s] - fixed[o][s] for o in learned for s in learned[o]
                     if s in fixed.get(o, {})]
            if diffs:
                best = max(fixed, key=lambda o: statistics.mean(fixed[o].values()))
                all_learned = [v for o in learned for v in learned[o].values()]
                lines.append(f"| {m} | {statistics.mean(diffs):+.2f} | "
                             f"{p_text(sign_flip_test(diffs))} | {sum(d > 0 for d in diffs)} of "
                             f"{len(diffs)} | {statistics.mean(all_learned):.2f} | {best} "
                             f"({statistics.mean(fixed[best].values()):.2f}) |")
    tasks = [r for r in rows if r["group"].startswith(("neighbours", "pairs"))]
    if tasks:
        lines += ["", "Known-answer tasks: val top-1, and where the partners sit in the final "
                  "order (mean slot distance; share of pairs within ±2 slots, the window).", "",
                  "| task | run | val top-1 | pair distance | pairs in reach |",
                  "|---|---|---:|---:|---:|"]
        for group in [f"{t}-{k}" for t in ("neighbours", "pairs")
                      for k in ("fixed", "reorder", "frozen")]:
            for order in sorted({r["order"] for r in tasks if r["group"] == group}):
                sel = [r for r in tasks if r["group"] == group and r["order"] == order]
                task, kind = group.split("-")
                label = {"fixed": f"fixed {order}", "reorder": f"REOrder from {order}",
                         "frozen": f"same curriculum, frozen policy ({order})"}[kind]
                lines.append(f"| {task} | {label} | {mean_std([r['val_top1'] for r in sel])} | "
                             f"{mean_std([r['pair_distance'] for r in sel])} | "
                             f"{mean_std([r['pairs_in_reach'] for r in sel])} |")
    for group in ("neighbours-fixed", "neighbours-reorder"):
        run_dir = os.path.join(out, f"{group}-window-row-s0")
        if any(r["group"] == group and r["seed"] == 0 for r in rows):
            lines += ["", f"The reward an order would get from the model of {group} from row "
                      "(seed 0), on 1,000 validation images:", "",
                      "| order | pair distance | pairs in reach | val loss | val top-1 |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {n} | {d:.2f} | {r:.2f} | {loss:.4f} | {acc:.1f} |"
                      for n, d, r, loss, acc in sensitivity(run_dir, "neighbours")]
    lines += plateau_tables(rows)
    if estimators:
        lines += ["", "The estimator and the optimizer alone (no model; 3 seeds):", ""]
        lines += estimator_table()
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    if figure and mixers:
        draw_results(rows, mixers, figure)
    if figure and any(r["group"].startswith("plateau-") for r in rows):
        draw_plateau(rows, os.path.join(os.path.dirname(figure), "plateau.png"))
    return text


def plateau_tables(rows):
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
            for o in (o for o in reorder.ORDERS if table(sel, group, m).get(o)):
                c = [r for r in sel if (r["group"], r["mixer"], r["order"]) == (group, m, o)]
                kind = {"plateau-fixed": "fixed", "plateau-reorder": "REOrder from",
                        "plateau-frozen": "frozen policy from"}[group]
                change = [r["last20_change"] for r in c]
                trend = [r["last20_trend"] for r in c]
                top1 = mean_std([r["val_top1"] for r in c])
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
        cells = table(sel, "plateau-fixed", m)
        blocks = complete_blocks(cells)
        if len(blocks) >= 2 and len(cells) >= 2:
            spread, noise, p = order_effect(blocks)
            means = dict(zip(sorted(cells), (statistics.mean(c) for c in zip(*blocks))))
            rank = " > ".join(f"{o} {v:.2f}" for o, v in sorted(means.items(), key=lambda x: -x[1]))
            lines.append(f"| {m} | {len(blocks)} | {rank} | {spread:.2f} | {noise:.2f} | "
                         f"{p_text(p)} | {2.8 * noise * math.sqrt(2 / len(blocks)):.2f} |")
    lines += ["", "REOrder at the paper's proportions, paired by seed: mean difference, sign-flip "
              "p (exact; with n pairs it cannot go below 2 / 2^n), pairs above 0, and the MDE of "
              "a paired difference (2.8 × std of the differences / √n).", "",
              "| mixer | comparison | difference | p | above 0 | MDE |",
              "|---|---|---:|---:|---:|---:|"]
    for m, start in dict.fromkeys((r["mixer"], r["order"]) for r in sel
                                  if r["group"] == "plateau-reorder"):
        for a, b in (("reorder", "fixed"), ("reorder", "frozen"), ("frozen", "fixed")):
            x, y = (table(sel, f"plateau-{g}", m).get(start, {}) for g in (a, b))
            d = [x[s] - y[s] for s in sorted(set(x) & set(y))]
            if d:
                mde = 2.8 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
                name = {"reorder": "REOrder", "fixed": f"fixed {start}", "frozen": "frozen"}
                p = p_text(sign_flip_test(d))
                lines.append(f"| {m} | {name[a]} − {name[b]} | {statistics.mean(d):+.2f} | {p} | "
                             f"{sum(v > 0 for v in d)} of {len(d)} | {mde:.2f} |")
    return lines


def draw_plateau(rows, path):
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


def sensitivity(run_dir, task, images=1000):
    """[(order, pair distance, pairs in reach, val loss, val top-1)] of a finished known-answer
    run's model under orders that bring the partners from side by side to far apart: what the
    reward of an order would be, for this model."""
    import torch
    import torch.nn.functional as F
    with open(os.path.join(run_dir, "config.json")) as f:
        model = reorder.ViT(reorder.ViTConfig(**json.load(f)["vit"]))
    model.load_state_dict(torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["model"])
    model.eval()
    val = data.build_dataset(task, None, "val", 32, subset=images)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    gap = 1 if task == "neighbours" else None
    orders = {name: reorder.order(name, *TASK_GRID) for name in reorder.ORDERS + ("random",)}
    orders["pairing"] = data.pair_order(*TASK_GRID, gap)
    table_rows = []
    with torch.no_grad():
        for name, perm in orders.items():
            apart = data.pair_gaps(perm, *TASK_GRID, gap)
            logits = model(x, perm)
            table_rows.append((name, apart.mean().item(), (apart <= 2).float().mean().item(),
                               F.cross_entropy(logits, y).item(),
                               100 * (logits.argmax(1) == y).float().mean().item()))
    return sorted(table_rows, key=lambda r: r[1])


def estimator_table(steps=500, seeds=(0, 1, 2)):
    """No model: REINFORCE on "the 32 pairs (i, i + 32) of an 8 x 8 grid should sit together",
    from row-major (pair distance 32), tau 0.2. With the real reward, where does each estimator
    get (mean pair distance of the mode); with rewards that cannot tell orders apart (a random
    number per step, the same for the K orders, as a model that ignores the order gives), how far
    do the patches move (mean slots from row-major)?"""
    import torch
    import train
    row = reorder.order("row", 8, 8)

    def distance(perms):
        return data.pair_distance(perms, 8, 8)

    def run(k, optimizer, lr, seed, signal):
        g = torch.Generator().manual_seed(seed)
        policy = reorder.PlackettLuce.from_order(row)
        opt = (train.policy_optimizer(policy, lr) if optimizer == "SGD"
               else torch.optim.Adam(policy.parameters(), lr=lr))
        ema = reorder.EMABaseline(0.99)
        for _ in range(steps):
            perms = policy.sample(k, 0.2, g)[0]
            reward = (-distance(perms) / 32 if signal
                      else torch.randn(1, generator=g).expand(k).clone())
            baseline = reorder.loo_baseline(reward) if k > 1 else ema(reward.mean().item())
            train.policy_update(policy, opt, perms, 0.2, reward, baseline)
        mode = policy.mode()
        return distance(mode).item() if signal else (mode.argsort() - row).abs().float().mean()

    lines = [f"| estimator | optimizer, lr | pair distance after {steps} steps (32 at the start) "
             f"| slots moved on rewards without signal |", "|---|---|---:|---:|"]
    for k, optimizer, lr in ((1, "Adam", 0.05), (1, "SGD", 0.1), (4, "Adam", 0.05),
                             (4, "SGD", 3.0), (8, "SGD", 3.0)):
        found = [run(k, optimizer, lr, s, True) for s in seeds]
        moved = [float(run(k, optimizer, lr, s, False)) for s in seeds]
        name = "1 order, EMA baseline (paper)" if k == 1 else f"{k} orders, leave-one-out"
        lines.append(f"| {name} | {optimizer}, {lr} | {mean_std(found)} | {mean_std(moved)} |")
    return lines


def draw_results(rows, mixers, path):
    """One PNG: a panel per mixer, val top-1 per ordering, mean ± std over seeds; fixed orders
    in blue, REOrder from each in orange beside them; the control in grey."""
    from PIL import Image, ImageDraw
    values = [r["val_top1"] for r in rows if r["mixer"] in mixers
              and r["group"] in ("fixed", "reorder", "control")]
    lo, hi = math.floor(min(values)) - 1, math.ceil(max(values)) + 1
    pw, ph, top, left = 300, 260, 40, 46
    sheet = Image.new("RGB", (len(mixers) * pw + left, ph + top + 60), "white")
    pen = ImageDraw.Draw(sheet)

    def y_of(v):
        return top + ph - (v - lo) / (hi - lo) * ph
    for v in range(lo, hi + 1):
        if v % 2 == 0:
            pen.line([(left, y_of(v)), (left + len(mixers) * pw, y_of(v))], fill=(230, 230, 230))
            pen.text((6, y_of(v) - 6), f"{v}", fill="black")
    colours = {"fixed": (31, 119, 180), "reorder": (255, 127, 14), "control": (120, 120, 120)}
    for k, m in enumerate(mixers):
        x0 = left + k * pw
        pen.rectangle([x0, top, x0 + pw, top + ph], outline="black")
        pen.text((x0 + 8, top - 18), "full attention (control)" if m == "full" else m,
                 fill="black")
        groups = ("control",) if m == "full" else ("fixed", "reorder")
        for j, name in enumerate(reorder.ORDERS):
            xc = x0 + (j + 0.5) * pw / len(reorder.ORDERS)
            pen.text((xc - 18, top + ph + 6 + 12 * (j % 2)), name[:8], fill="black")
            for g, group in enumerate(groups):
                vals = list(table(rows, group, m).get(name, {}).values())
                if not vals:
                    continue
                x = xc + (g - (len(groups) - 1) / 2) * 14
                mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0
                pen.line([(x, y_of(mean - sd)), (x, y_of(mean + sd))], fill=colours[group],
                         width=2)
                pen.ellipse([x - 4, y_of(mean) - 4, x + 4, y_of(mean) + 4], fill=colours[group])
    pen.text((left, top + ph + 36), "val top-1 (%), mean ± std over seeds:  blue = fixed order,"
             "  orange = REOrder started from it,  grey = full attention", fill="black")
    sheet.save(path, format="PNG", optimize=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default=",".join(GROUPS), help="comma-separated: "
                    + ", ".join(GROUPS))
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                    help="seeds of the Fashion-MNIST groups")
    ap.add_argument("--mixers", default=",".join(PLATEAU_MIXERS), help="of the plateau groups")
    ap.add_argument("--orders", default=",".join(PLATEAU_ORDERS), help="of group plateau")
    ap.add_argument("--task-seeds", default=",".join(map(str, TASK_SEEDS)))
    ap.add_argument("--root", default=None, help="Fashion-MNIST's folder (plateau groups)")
    ap.add_argument("--task-subset", default=None, help="known-answer tasks: training images")
    ap.add_argument("--task-batch", default=None, help="known-answer tasks: batch size")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--report", action="store_true", help="only rebuild the tables and picture")
    ap.add_argument("--figure", default=os.path.join(ROOT, "figures", "results.png"))
    args = ap.parse_args(argv)
    groups = set(args.groups.split(","))
    if groups - set(GROUPS):
        ap.error(f"unknown group(s) {', '.join(sorted(groups - set(GROUPS)))}")
    os.makedirs(args.out, exist_ok=True)
    if "pairs" in groups:
        data.save_order(os.path.join(args.out, "pair_order.pt"), data.pair_order(*TASK_GRID),
                        TASK_GRID)
    jobs = runs(groups, args.out, [int(s) for s in args.seeds.split(",")],
                args.mixers.split(","), args.orders.split(","),
                [int(s) for s in args.task_seeds.split(",")], args.root,
                {k: v for k, v in (("subset", args.task_subset), ("batch_size", args.task_batch))
                 if v})
    if not args.report:
        t0 = time.time()

        def log(msg):
            print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)
        log(f"{len(jobs)} runs, {args.jobs} at a time, into {args.out}")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: launch(job, log), jobs))
        log("done")
    print(report(collect(jobs), args.out, args.figure,  # the estimators' table: ~1 min
                 estimators=bool(groups & {"fixed", "control", "reorder"})))


if __name__ == "__main__":
    main()
