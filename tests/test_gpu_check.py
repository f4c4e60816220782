"""tests/gpu_check.py: its report (rows kept across calls, rows over budget skipped with a line),
--docs on a copy of docs/results.md, and (slow) the CPU dry run of every part, killed and resumed.
Its numbers say nothing about a GPU."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = "NVIDIA H100 80GB HBM3"


def blocks(text):
    """{part: text between its marker lines}, and the text outside the blocks."""
    found = dict(re.findall(r"\n<!-- gpu_check: ([\w-]+) -->\n(.*?)\n<!-- gpu_check: end -->\n",
                            text, re.S))
    return found, re.sub(r"(\n<!-- gpu_check: [\w-]+ -->\n).*?(\n<!-- gpu_check: end -->\n)",
                         r"\1\2", text, flags=re.S)


def fabricated_report(path):
    report = gpu_check.Report(str(path), H100, 480, ["tests/gpu_check.py", "--all"])
    report.add("correctness", ["bimamba: bfloat16 vs CPU", "logits 8.1e-03"], True)
    report.add("paper-scale", ["bimamba", 128, "900", "300", "2500", "41.3", "0.40", "70.1"])
    return report


def test_docs_fills_the_measured_parts_blocks_and_nothing_else(tmp_path):
    fabricated_report(tmp_path)
    results = tmp_path / "results.md"
    shutil.copy(gpu_check.RESULTS, results)
    before, outside = blocks(results.read_text())
    assert set(before) == set(gpu_check.PARTS)
    assert gpu_check.main(["--docs", str(tmp_path / "report.json"), "--results",
                           str(results)]) is None
    after, outside_after = blocks(results.read_text())
    assert outside_after == outside  # the page around the blocks as it was
    for part in ("correctness", "paper-scale"):
        assert f"on **{H100}**" in after[part] and "Not measured" not in after[part]
    assert "| bimamba: bfloat16 vs CPU | logits 8.1e-03 | ok |" in after["correctness"]
    assert "| bimamba | 128 | 900 | 300 | 2500 | 41.3 | 0.40 | 70.1 |" in after["paper-scale"]
    for part in ("speed", "compile", "evidence"):  # nothing measured: the block kept
        assert after[part] == before[part]


def test_docs_refuses_a_page_without_its_markers(tmp_path, capsys):
    fabricated_report(tmp_path)
    results = tmp_path / "results.md"
    text = open(gpu_check.RESULTS).read().replace("<!-- gpu_check: speed -->\n", "")
    results.write_text(text)
    assert gpu_check.main(["--docs", str(tmp_path / "report.json"), "--results",
                           str(results)]) == 2
    assert results.read_text() == text
    assert capsys.readouterr().err.count("\n") == 1


def test_rows_are_kept_across_calls_and_a_row_over_budget_is_skipped_with_a_line(tmp_path):
    fabricated_report(tmp_path)
    again = gpu_check.Report(str(tmp_path), H100, 0, ["tests/gpu_check.py", "--all"])
    assert not again.wanted("correctness", "bimamba: bfloat16 vs CPU", 0)  # done: no line
    assert not again.wanted("speed", "a step", 40)  # no budget left
    run = ["causal", "row", "0"]
    again.add("evidence", ["s0", *run, "partial", "3/20", "", ""], done=False)  # stopped,
    again.add("evidence", ["s1", *run, "done", "20/20", "", ""])
    again.add("evidence", ["s0", *run, "done", "20/20", "", ""])  # then finished: in its place
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert [r["call"] for r in report["parts"]["correctness"]["rows"]] == [1]
    assert report["parts"]["correctness"]["skipped"] == []
    assert report["parts"]["speed"]["skipped"] == [
        "a step: skipped, it needs about 40 s and 0 s of the budget are left"]
    assert "- a step: skipped, it needs about 40 s" in (tmp_path / "report.md").read_text()
    assert [r["cells"][:5] for r in report["parts"]["evidence"]["rows"]] == [
        ["s0", *run, "done"], ["s1", *run, "done"]]


def test_a_report_from_another_device_is_not_continued(tmp_path, capsys):
    fabricated_report(tmp_path)
    before = (tmp_path / "report.json").read_bytes()
    assert gpu_check.main(["--all", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "report.json").read_bytes() == before
    assert "measured on NVIDIA H100" in capsys.readouterr().err


def dry_run(out, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--all",
                             "--device", "cpu", "--out", str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def rows(out):
    with open(out / "report.json") as f:
        return {(p, r["cells"][0]): r for p, v in json.load(f)["parts"].items()
                for r in v["rows"]}


@pytest.mark.slow
def test_dry_run_killed_then_resumed_measures_every_part_once(tmp_path):
    out = tmp_path / "gpu"
    first = dry_run(out)  # killed (SIGKILL) once a few rows are written
    while not (out / "report.json").exists() or len(rows(out)) < 3:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = rows(out)  # whole JSON: written atomically
    second = dry_run(out)
    log = second.communicate(timeout=1200)[0]
    assert second.returncode == 0, log[-3000:]
    measured = rows(out)
    assert {k: measured[k] for k in kept} == kept  # not measured again
    names = {p: [k for q, k in measured if q == p] for p in gpu_check.PARTS}
    assert len(names["correctness"]) == 6 * 2 + 1 + 2  # mixers x (float32, bf16), policy, scans
    assert all(r["ok"] for (p, _), r in measured.items() if p in ("correctness", "compile"))
    assert len(names["speed"]) == 2 and names["paper-scale"] == list(gpu_check.PAPER_MIXERS)
    assert len(names["compile"]) == 4 and len(names["evidence"]) == 10
    assert all(r["cells"][4] == "done" and r["cells"][5] == "4/4"
               for (p, _), r in measured.items() if p == "evidence")
    md = (out / "report.md").read_text()
    for part in gpu_check.PARTS:
        assert f"\n## {part}\n" in md and all(f"| {k} |" in md for k in names[part])
    assert "| causal | REOrder − frozen |" in md  # the plateau tables over the finished runs
    metrics = {p: os.stat(p).st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    third = dry_run(out)
    assert third.communicate(timeout=300)[0] and third.returncode == 0
    with open(out / "report.json") as f:
        report = json.load(f)
    assert [c["measured"] for c in report["calls"]][1:] == [len(measured) - len(kept), 0]
    assert rows(out) == measured and len(metrics) == 10
    assert {p: os.stat(p).st_mtime_ns for p in metrics} == metrics  # no run started again
    results = tmp_path / "results.md"  # --docs on a copy of the page, from the dry run's report
    shutil.copy(gpu_check.RESULTS, results)
    assert gpu_check.main(["--docs", str(out / "report.json"), "--results", str(results)]) is None
    filled, _ = blocks(results.read_text())
    assert all(f"on **{gpu_check.DRY_RUN}**" in filled[p] for p in gpu_check.PARTS)


@pytest.mark.slow
def test_evidence_stops_its_runs_at_the_budget_and_lists_the_rest(tmp_path, monkeypatch):
    # three runs, one at a time; the budget runs out once the first has started: it is stopped
    # (SIGTERM), the other two are listed as not started, and the part ends
    runs = [("plateau-fixed", "causal", "row", s, ["--data", "synthetic", "--subset", "64",
                                                   "--epochs", "4", "--quiet", "--out",
                                                   str(tmp_path / "runs" / f"r{s}")])
            for s in range(3)]
    monkeypatch.setattr(gpu_check, "evidence_jobs", lambda *a: runs)
    report = gpu_check.Report(str(tmp_path), gpu_check.DRY_RUN, 480, ["tests/gpu_check.py"])
    left = iter([100.0] * 2)  # enough to start, then 10 s left (less than the 30 to stop in)
    monkeypatch.setattr(report, "left", lambda: next(left, 10.0))
    part = threading.Thread(target=gpu_check.evidence, daemon=True,
                            args=(report, gpu_check.torch.device("cpu"), None, True, 1))
    part.start()
    part.join(timeout=120)
    assert not part.is_alive()  # it ends
    status = [r["cells"][4] for r in report.data["parts"]["evidence"]["rows"]]
    assert status == ["stopped", "not started", "not started"]
    assert not any(r["done"] for r in report.data["parts"]["evidence"]["rows"])
