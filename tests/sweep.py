"""The evidence sweep (README "Results"): train.py runs on Fashion-MNIST and on the known-answer task.

    python tests/sweep.py                      # everything, 2 runs at a time, into runs/sweep
    python tests/sweep.py --groups pairs       # only the known-answer task
    python tests/sweep.py --report             # only rebuild the tables from finished runs

Groups (3 seeds each, one fixed budget per run, BUDGET below):
  fixed   the windowed model on each of the six orderings
  full    the same with full attention: the control, which should not depend on the ordering
  learn   --learn-order from each ordering and from --order prior, same total epochs
  pairs   the known-answer task (train.py --data pairs): row-major, the pairing order, and
          --learn-order from row-major; also the pairs' mean slot distance before and after
Each run is a train.py process with one thread. A finished run (its metrics.jsonl has every epoch) is
not run again, an interrupted one is resumed, so the sweep can be stopped and restarted. Writes
runs/sweep/results.csv (one row per run) and results.md (mean ± std over seeds per cell).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import reorder  # noqa: E402
import train  # noqa: E402

MODEL = ["--model", "tiny", "--dim", "64", "--depth", "4", "--heads", "2", "--window", "2"]
BUDGET = ["--subset", "8000", "--val-subset", "5000", "--epochs", "5", "--batch-size", "32", "--lr", "1e-3",
          "--warmup-epochs", "1",
          "--policy-lr", "1e-3", "--quiet"]
PAIRS = ["--data", "pairs", "--subset", "12000", "--val-subset", "2000", "--epochs", "5", "--batch-size", "128",
         "--lr", "1e-3", "--policy-lr", "1e-2", "--quiet"]
SEEDS = (0, 1, 2)
PAIR_GRID = reorder.grid_size(32, 4)  # train.py's default --img-size and --patch


def flag(args, name):
    """The value given to `name` in a train.py argument list."""
    return args[args.index(name) + 1]


def runs(groups, out):
    """[(group, start order, seed, train.py arguments)] of the chosen groups."""
    jobs = []
    for seed in SEEDS:
        for name in reorder.ORDERS + ("prior",):
            fmnist = ["--data", "fashion-mnist", "--order", name, "--seed", str(seed)] + MODEL + BUDGET
            if name != "prior" and "fixed" in groups:
                jobs.append(("fixed", name, seed, fmnist))
            if name != "prior" and "full" in groups:
                jobs.append(("full", name, seed, fmnist + ["--window", "none"]))
            if "learn" in groups:
                jobs.append(("learn", name, seed, fmnist + ["--learn-order"]))
        if "pairs" in groups:
            pair_file = os.path.join(out, "pair_order.pt")
            for group, order, extra in (("pairs", "row", []), ("pairs", "pairing", []),
                                        ("pairs-learn", "row", ["--learn-order"])):
                path = pair_file if order == "pairing" else order
                jobs.append((group, order, seed, ["--order", path, "--seed", str(seed)] + MODEL + PAIRS + extra))
    return [(g, o, s, a + ["--out", os.path.join(out, f"{g}-{o}-s{s}")]) for g, o, s, a in jobs]


def history(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def launch(job, log):
    group, order, seed, args = job
    run_dir = flag(args, "--out")
    if len(history(run_dir)) >= int(flag(args, "--epochs")):
        return
    resume = ["--resume"] if os.path.exists(os.path.join(run_dir, "last.pt")) else []
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(os.path.join(os.path.dirname(run_dir), f"{os.path.basename(run_dir)}.log"), "a") as f:
        code = subprocess.call([sys.executable, "train.py", *args, *resume], stdout=f, stderr=subprocess.STDOUT,
                               env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log(f"{group:12s} {order:9s} seed {seed}: exit {code}, {time.time() - t0:.0f} s")


def collect(jobs):
    """One row per finished run: final val top-1, and for the pairs task the pairs' slot distance."""
    rows = []
    for group, order, seed, args in jobs:
        run_dir = flag(args, "--out")
        h = history(run_dir)
        if len(h) < int(flag(args, "--epochs")):
            continue
        row = {"group": group, "order": order, "seed": seed, "val_top1": round(h[-1]["val_top1"], 2),
               "seconds": round(sum(e["seconds"] for e in h), 1), "learned_shift": round(h[-1]["order_shift"], 2)}
        if group.startswith("pairs"):
            start = train.load_checkpoint(os.path.join(run_dir, "last.pt"))["start_perm"]
            final = data.load_order(os.path.join(run_dir, "order.pt"), PAIR_GRID[0] * PAIR_GRID[1])
            row["pair_distance_start"] = data.pair_distance(start, *PAIR_GRID)
            row["pair_distance_final"] = data.pair_distance(final, *PAIR_GRID)
        if order == "prior":
            with open(os.path.join(run_dir, "config.json")) as f:
                row["order"] = json.load(f)["order_name"]
        rows.append(row)
    return rows


def mean_std(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def report(rows, out):
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        keys = ["group", "order", "seed", "val_top1", "seconds", "learned_shift", "pair_distance_start",
                "pair_distance_final"]
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)

    def cell(group, order):
        return [r["val_top1"] for r in rows if r["group"] == group and r["order"] == order]

    lines = ["Final val top-1 (%), mean ± std over seeds (n = seeds finished).", ""]
    groups = [g for g in ("fixed", "full", "learn") if any(r["group"] == g for r in rows)]
    if groups:
        names = list(reorder.ORDERS)
        priors = sorted({r["order"] for r in rows if r["order"].startswith("prior:")})
        lines += ["| ordering | " + " | ".join({"fixed": "windowed", "full": "full attention",
                                                  "learn": "REOrder (from it)"}[g] for g in groups) + " |",
                  "|---|" + "---:|" * len(groups)]
        for name in names + priors:
            vals = [f"{mean_std(v)} (n={len(v)})" if v else "" for v in (cell(g, name) for g in groups)]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
        for g in groups:
            means = [statistics.mean(v) for v in (cell(g, n) for n in names) if v]
            stds = [statistics.stdev(v) for v in (cell(g, n) for n in names) if len(v) > 1]
            if means:
                lines.append(f"- {g}: spread across orderings (max - min of means) {max(means) - min(means):.2f}, "
                             f"mean seed-to-seed std {statistics.mean(stds) if stds else float('nan'):.2f}")
        both = [(statistics.mean(cell("learn", n)) - statistics.mean(cell("fixed", n)))
                for n in names if cell("learn", n) and cell("fixed", n)]
        if both:
            lines.append(f"- REOrder minus its fixed start, averaged over orderings: {statistics.mean(both):+.2f} "
                         f"({sum(d > 0 for d in both)} of {len(both)} orderings above)")
    pairs = [r for r in rows if r["group"].startswith("pairs")]
    if pairs:
        lines += ["", "Known-answer task (--data pairs): val top-1 and the pairs' mean slot distance.", "",
                  "| run | val top-1 | pair distance, start | pair distance, final |", "|---|---:|---:|---:|"]
        for group, order in (("pairs", "row"), ("pairs", "pairing"), ("pairs-learn", "row")):
            sel = [r for r in pairs if r["group"] == group and r["order"] == order]
            if sel:
                label = f"{'--learn-order from ' if group == 'pairs-learn' else ''}{order}"
                lines.append(f"| {label} | {mean_std([r['val_top1'] for r in sel])} | "
                             f"{mean_std([r['pair_distance_start'] for r in sel])} | "
                             f"{mean_std([r['pair_distance_final'] for r in sel])} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="fixed,full,learn,pairs", help="comma-separated: fixed, full, learn, pairs")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--report", action="store_true", help="only rebuild results.md / results.csv")
    args = ap.parse_args(argv)
    groups = set(args.groups.split(","))
    if groups - {"fixed", "full", "learn", "pairs"}:
        ap.error(f"unknown group(s) {', '.join(sorted(groups - {'fixed', 'full', 'learn', 'pairs'}))}")
    os.makedirs(args.out, exist_ok=True)
    if "pairs" in groups:
        data.save_order(os.path.join(args.out, "pair_order.pt"), data.pair_order(*PAIR_GRID), PAIR_GRID)
    jobs = runs(groups, args.out)
    if not args.report:
        t0 = time.time()

        def log(msg):
            print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)
        log(f"{len(jobs)} runs, {args.jobs} at a time, into {args.out}")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: launch(job, log), jobs))
        log("done")
    print(report(collect(jobs), args.out))


if __name__ == "__main__":
    main()
