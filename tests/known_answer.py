"""The README's demo from each of the six orderings (issue 35): how many partners the co-trained
policy puts side by side by the end, val top-1, and the frozen twin's (--policy-lr 0), per seed,
with each run's CPU time (user + sys, the figure that contention changes least) and wall time.

    python tests/known_answer.py                                  # 6 starts x 8 seeds, and twins
    python tests/known_answer.py --starts spiral,row --seeds 0 --twin-seeds 0
    python tests/known_answer.py --report                         # only the table of runs done
    python tests/known_answer.py --reach     # how far apart pairs must be under the six orders

Runs go two at a time, one thread each, into runs/known-answer/<start>-s<seed>[-frozen]; a run
whose result.json exists is not run again, so the sweep can be stopped and restarted. Prints the
table that docs/results.md holds (and writes it to runs/known-answer/table.md).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import reorder  # noqa: E402
# the README's first command, less --order and --out
DEMO = ["--data", "majority", "--img-size", "16", "--patch", "4", "--dim", "32", "--depth", "2",
        "--heads", "2", "--window", "1", "--subset", "2048", "--val-subset", "1000",
        "--batch-size", "64", "--lr", "3e-3", "--epochs", "36", "--policy-start", "14",
        "--policy-epochs", "16", "--fixed-tau", "0.2", "--tau-max", "0.1", "--policy-lr", "0.1",
        "--granularity", "image", "--learn-order"]
STARTS = ("row", "column", "hilbert", "spiral", "diagonal", "snake")


def run(out, start, seed, frozen):
    """One train.py run (cached in out/result.json): partners side by side, val top-1, times."""
    path = os.path.join(out, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *DEMO, "--order", start, "--seed",
           str(seed), "--out", out, "--quiet"] + (["--policy-lr", "0"] if frozen else [])
    if os.path.isdir(out):  # a run cut short: start it again
        subprocess.run(["rm", "-r", out], check=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.time()
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed: see {out}.log")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    last = history[-1]
    learn = [h for h in history if h["phase"] == "learn"]
    result = {"start": start, "seed": seed, "frozen": frozen, "side_by_side": last["side_by_side"],
              "val_top1": last["val_top1"], "cpu_s": usage.ru_utime + usage.ru_stime,
              "wall_s": time.time() - t0,
              # what the classifier read on the start order when learning began (50%: nothing)
              "fixed_top1": [h for h in history if h["phase"] == "fixed"][-1]["val_top1"],
              # how far apart the K orders' rewards on the same images were, at most, while
              # learning, against the batch-to-batch noise of the reward (train.epoch_record)
              "spread": max((h["order_spread"] or 0) for h in learn) if learn else None,
              "noise": sum(h["batch_noise"] or 0 for h in learn) / max(1, len(learn))}
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def table(results, starts, seeds):
    """Markdown: a row per start, a cell per seed "side by side, val top-1 (twin's)", then what
    the classifier read on the start when learning began and the K orders' reward spread."""
    got = {(r["start"], r["seed"], r["frozen"]): r for r in results}
    lines = ["| start | " + " | ".join(f"seed {s}" for s in seeds) + " | reached 8/8 | val top-1 "
             "on the start when learning began | K orders' reward spread, largest (batch "
             "noise) | CPU s | wall s |", "|---" * (len(seeds) + 6) + "|"]
    for start in starts:
        cells, runs = [], [r for k, r in got.items() if k[0] == start]
        for s in seeds:
            r, twin = got.get((start, s, False)), got.get((start, s, True))
            cells.append("–" if r is None else f"{r['side_by_side']}/8 {r['val_top1']:.1f}" +
                         (f" ({twin['val_top1']:.1f})" if twin else ""))
        done = [r for r in runs if not r["frozen"]]
        if not done:
            continue
        reached = sum(r["side_by_side"] == 8 for r in done)
        read = sorted(r["fixed_top1"] for r in done)
        spread = max(r["spread"] for r in done)
        noise = sum(r["noise"] for r in done) / len(done)
        cpu, wall = [r["cpu_s"] for r in runs], [r["wall_s"] for r in runs]
        lines.append(f"| {start} | " + " | ".join(cells) + f" | {reached} of {len(done)} | "
                     f"{read[0]:.1f}–{read[-1]:.1f} | {spread:.1e} ({noise:.1e}) | "
                     f"{min(cpu):.0f}–{max(cpu):.0f} | {min(wall):.0f}–{max(wall):.0f} |")
    return "\n".join(lines)


def common_reach(h=4, w=4):
    """(R, pairs): the smallest R such that some pairing of the h x w patches keeps every pair
    within R slots under each of the six orders, and one such pairing (a search over pairings,
    pruned by R). A model that reads pairs only within R slots can be rewarded from every start
    only on a task whose pairs are all that close; on 4 x 4, R = 5."""
    slots = [reorder.order(name, h, w).argsort() for name in STARTS]
    apart = torch.stack([(s[:, None] - s[None, :]).abs() for s in slots]).amax(0)  # [N, N]

    def pairing(R, left):  # a pairing of the patches `left` within R of each other, or None
        if not left:
            return []
        for b in left[1:]:
            if apart[left[0], b] <= R:
                rest = pairing(R, [c for c in left[1:] if c != b])
                if rest is not None:
                    return [(left[0], b)] + rest
        return None

    for R in range(1, h * w):
        pairs = pairing(R, list(range(h * w)))
        if pairs is not None:
            return R, pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", default=",".join(STARTS), help="comma-separated orderings")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="comma-separated seeds")
    ap.add_argument("--twin-seeds", default="0,1,2,3,4,5,6,7",
                    help="seeds that also run the frozen twin (--policy-lr 0); '' for none")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "known-answer"))
    ap.add_argument("--report", action="store_true", help="run nothing: tabulate the runs done")
    ap.add_argument("--reach", action="store_true", help="run nothing: the demo's pairs' slots "
                    "apart under each start, and the smallest reach any pairing can have")
    args = ap.parse_args(argv)
    if args.reach:
        for start in STARTS:
            gaps = data.pair_gaps(reorder.order(start, 4, 4), 4, 4).int().tolist()
            print(f"{start:9s} the demo's pairs are {gaps} slots apart")
        R, pairs = common_reach()
        print(f"no pairing of the 4 x 4 patches keeps every pair within {R - 1} slots under all "
              f"six orders; within {R}: {pairs}")
        return
    starts, seeds = args.starts.split(","), [int(s) for s in args.seeds.split(",")]
    twins = {int(s) for s in args.twin_seeds.split(",") if s}
    jobs = [(start, seed, frozen) for seed in seeds for start in starts  # seed-major: a partial
            for frozen in (False, True) if not frozen or seed in twins]  # sweep covers each start
    folder = {job: os.path.join(args.out, f"{job[0]}-s{job[1]}" + "-frozen" * job[2])
              for job in jobs}
    if args.report:
        jobs = [job for job in jobs if os.path.exists(os.path.join(folder[job], "result.json"))]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run(folder[job], *job), jobs))
    text = table(results, starts, seeds)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
