"""Hostile files and folders (issue 26): one line and exit status 2, nothing written outside the
run folder, no file of the user's deleted or overwritten, a damaged checkpoint named as damaged."""
import argparse
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import data
import prior
import reorder
import train

TINY = ["--data", "synthetic", "--subset", "128", "--val-subset", "64", "--batch-size", "16",
        "--img-size", "16", "--patch", "4", "--depth", "1", "--dim", "32", "--heads", "2",
        "--quiet", "--epochs", "2", "--save-every", "2"]
PRIOR = ["--data", "synthetic", "--n", "8", "--img-size", "16", "--patch", "4", "--workers", "1",
         "--codebook", "4"]


def fails(capsys, main, argv, message):
    """main(argv) ends with exit status 2 and one line on stderr holding `message`."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    return err


def snapshot(folder):
    """Every entry under folder, links not followed: {path: bytes, link target or "folder"}."""
    entries = {}
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(parent, name)
            entries[os.path.relpath(path, folder)] = (
                "-> " + os.readlink(path) if os.path.islink(path) else "folder" if
                os.path.isdir(path) else "fifo" if not os.path.isfile(path) else
                open(path, "rb").read())
    return entries


def half_done(tmp_path, name="run"):
    """A run folder whose last.pt is 1 of 2 epochs done (what --resume continues), and a pid in
    train.lock that no run of this process writes (a lock written too early would show)."""
    out = str(tmp_path / name)
    train.main([*TINY, "--out", out])
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True) \
        if ckpt["progress"]["epoch"] != 1 else ckpt
    ckpt["progress"].update(epoch=1, done_in_epoch=0, history=ckpt["progress"]["history"][:1],
                            best=0)
    torch.save(ckpt, os.path.join(out, "last.pt"))
    with open(os.path.join(out, "train.lock"), "w") as f:
        f.write("999999\n")
    return out


def bypasses_permissions(tmp_path):
    """True where this process reads a file of mode 000 (root with CAP_DAC_OVERRIDE)."""
    path = tmp_path / "mode000"
    path.write_text("")
    path.chmod(0)
    try:
        open(path).close()
        return True
    except PermissionError:
        return False
    finally:
        path.unlink()


# ---- 1. nothing is written through a link, nor into a file the run did not make -----------------

@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo", "folder"])
def test_a_lock_that_is_no_file_of_ours_is_one_line_and_what_it_points_to_is_untouched(
        tmp_path, capsys, kind):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("the user's file\n")
    lock = out / "train.lock"
    {"symlink": lambda: lock.symlink_to(victim), "hard link": lambda: os.link(victim, lock),
     "dangling symlink": lambda: lock.symlink_to(tmp_path / "made-through-the-link"),
     "fifo": lambda: os.mkfifo(lock), "folder": lock.mkdir}[kind]()
    before = snapshot(tmp_path)
    with deadline(60):  # a FIFO opened for reading only would block
        fails(capsys, train.main, [*TINY, "--out", str(out)], "as this run's lock")
    assert snapshot(tmp_path) == before


def test_a_lock_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    if bypasses_permissions(tmp_path):
        pytest.skip("this process bypasses file permissions (root): a lock of mode 000 opens; "
                    "the folder case of the test above takes the same path")
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.lock").write_text("4321\n")
    (out / "train.lock").chmod(0o444)
    before = snapshot(tmp_path)
    fails(capsys, train.main, [*TINY, "--out", str(out)], "(PermissionError")
    assert snapshot(tmp_path) == before


def test_links_at_every_output_name_are_replaced_never_written_through(tmp_path, capsys):
    out = half_done(tmp_path)
    victims = {}
    for name in train.OUTPUTS:
        for planted in (f"{name}.tmp",) + ((name,) if name in ("order.png", "config.json")
                                           else ()):
            victim = tmp_path / f"victim-{planted}"
            victim.write_text(planted)
            if os.path.lexists(os.path.join(out, planted)):
                os.remove(os.path.join(out, planted))
            os.symlink(victim, os.path.join(out, planted))
            victims[victim] = planted
    train.main([*TINY, "--out", out, "--resume"])
    assert all(victim.read_text() == text for victim, text in victims.items())
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2


# ---- 2. only the run's own leftovers are removed, by exact name, once the run is accepted --------

def test_a_users_tmp_files_survive_and_ours_go_only_once_the_run_is_accepted(tmp_path, capsys):
    out = half_done(tmp_path)
    for name, content in (("download.tmp", "mine"), ("last.pt.tmp", "a killed write's")):
        with open(os.path.join(out, name), "w") as f:
            f.write(content)
    os.makedirs(os.path.join(out, "something.tmp", "inside"))
    before = snapshot(out)
    fails(capsys, train.main, [*TINY, "--out", out], "already holds a run")  # refused: untouched
    fails(capsys, train.main, [*TINY, "--out", out, "--resume", "--seed", "1"],
          "does not match this run")
    assert snapshot(out) == before
    train.main([*TINY, "--out", out, "--resume"])  # accepted: only last.pt.tmp goes
    after = snapshot(out)
    assert "last.pt.tmp" not in after and after["download.tmp"] == b"mine"
    assert after["something.tmp"] == after["something.tmp/inside"] == "folder"


@pytest.mark.parametrize("name", ["last.pt.tmp", "order.png", "metrics.jsonl.tmp"])
def test_a_folder_where_the_run_writes_a_file_is_one_line_before_any_work(tmp_path, capsys, name):
    out = half_done(tmp_path)
    if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
    os.mkdir(os.path.join(out, name))
    before = snapshot(out)
    fails(capsys, train.main, [*TINY, "--out", out, "--resume"], f"{name} is a folder where")
    assert snapshot(out) == before


# ---- 3. a damaged checkpoint is named as damaged ------------------------------------------------

def damage_a_tensor(path):
    """Four bytes overwritten in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename),
                     key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name, extra = struct.unpack("<HH", f.read(4))
        f.seek(record.header_offset + 30 + name + extra + record.file_size // 2)
        f.write(b"\xff\xff\xff\x7f")


def test_a_checkpoint_whose_crc_fails_is_named_damaged_and_nothing_is_written(tmp_path, capsys):
    out = half_done(tmp_path)
    damage_a_tensor(os.path.join(out, "last.pt"))
    torch.load(os.path.join(out, "last.pt"), weights_only=True)  # torch.load does not notice
    before = snapshot(out)
    err = fails(capsys, train.main, [*TINY, "--out", out, "--resume"], "last.pt is damaged")
    assert "/data/" in err and "fails its CRC-32 check" in err
    assert snapshot(out) == before


# ---- 4. a hand-edited checkpoint: one line, nothing written (see also test_train.EDITS) ----------

EDITS = {  # the five, then other fields train.py reads or loads
    "history [5]": (lambda c: c["progress"].update(history=[5]), "progress.history is not"),
    "no val_top1 in a row": (lambda c: c["progress"]["history"][0].pop("val_top1"),
                             "progress.history is not"),
    "a tensor in a history row": (lambda c: c["progress"]["history"][0].update(
        train_loss=torch.tensor(1.0)), "Tensor is not JSON serializable"),
    "a non-number in sums": (lambda c: c["progress"]["sums"][0].update(loss="x"), "progress.sums"),
    "config a list": (lambda c: c.update(config=[]), "config is missing, or not a dict"),
    "start_perm 2-D": (lambda c: c.update(start_perm=c["start_perm"][None]), "(1, 16)"),
    "a NaN weight": (lambda c: c["model"]["head.bias"].fill_(float("nan")), "model.head.bias"),
    "an infinite sum": (lambda c: c["progress"]["sums"][0].update(loss=float("inf")),
                        "progress.sums"),
    "Adam's moment of the wrong shape": (lambda c: c["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(3)), "does not have its parameter's shape"),
    "the baseline's value text": (lambda c: c["baseline"].update(value="x"), "are no numbers"),
    "the scheduler's step a float": (lambda c: c["scheduler"].update(last_epoch=3.5),
                                     "are no numbers"),
    "a float RNG state": (lambda c: c["rng"].update(cpu=torch.zeros(5)), "RNG state must be"),
    "changed a list": (lambda c: c["progress"].update(changed=[]), "progress is not"),
    "the checkpoint a list": (lambda c: [c], "model is missing, or not a dict"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_hand_edited_checkpoint_is_damaged_and_nothing_is_written(tmp_path, capsys, edit):
    out = half_done(tmp_path)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    change, message = EDITS[edit]
    edited = change(ckpt)
    ckpt = edited if isinstance(edited, list) else ckpt
    torch.save(ckpt, os.path.join(out, "last.pt"))
    before = snapshot(out)
    err = fails(capsys, train.main, [*TINY, "--out", out, "--resume"], message)
    assert "is damaged" in err and snapshot(out) == before


# ---- 5. an order file holds one order -----------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 16), (2, 16)])
def test_an_order_file_of_several_orders_is_one_line_everywhere_it_enters(tmp_path, capsys, shape):
    path = str(tmp_path / "orders.pt")
    torch.save(torch.arange(16).expand(*shape).clone(), path)
    message = f"one order is a LongTensor [16], not torch.int64 {shape}"
    for main, argv in [
            (train.main, [*TINY, "--order", path, "--out", str(tmp_path / "run")]),
            (train.main, [*TINY, "--order", path, "--learn-order", "--out", str(tmp_path / "r")]),
            (train.main, ["--draw-orders", str(tmp_path / "d.png"), "--img-size", "16",
                          "--patch", "4", "--order", path]),
            (prior.main, [*PRIOR, "--order-file", path, "--out", str(tmp_path / "p.json")])]:
        fails(capsys, main, argv, message)
    assert sorted(os.listdir(tmp_path)) == ["orders.pt"]


# ---- 6. paths -----------------------------------------------------------------------------------

@pytest.fixture
def odd_paths(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("out,message", [
    ("dangling", "dangling is a link to nowhere, or a loop"),
    ("loop", "loop is a link to nowhere, or a loop"),
    ("dangling/run", "dangling is a link to nowhere, or a loop"),
    ("afile", "afile is a file, not a folder"), ("", "an empty path")])
def test_out_that_is_no_folder_is_one_line_before_any_work(odd_paths, capsys, monkeypatch, out,
                                                          message):
    monkeypatch.chdir(odd_paths)  # where "" once meant runs/<default name>
    before = snapshot(odd_paths)
    fails(capsys, train.main, [*TINY, "--out", out], message)
    assert snapshot(odd_paths) == before


@pytest.mark.parametrize("out,message", [
    ("dangling/p.json", "dangling is a link to nowhere, or a loop"),
    ("loop/p.json", "loop is a link to nowhere, or a loop"), ("", "an empty path"),
    ("folder", "it is a folder, or not a regular file"), ("afile/p.json", "is a file, not a"),
    ("p.json", "p.json.tmp is in the way")])
def test_prior_out_is_checked_before_computing(odd_paths, capsys, monkeypatch, out, message):
    monkeypatch.setattr(prior, "compressibility", lambda *a, **k: pytest.fail("computed first"))
    monkeypatch.chdir(odd_paths)
    (odd_paths / "p.json.tmp").write_text("the user's")
    before = snapshot(odd_paths)
    fails(capsys, prior.main, [*PRIOR, "--out", out], message)
    assert snapshot(odd_paths) == before


@pytest.mark.parametrize("png,order,message", [
    ("folder", "row", "it is a folder, or not a regular file"),
    ("afile/d.png", "row", "afile is a file, not a folder"),
    ("dangling/d.png", "row", "dangling is a link to nowhere"),
    ("d.png", "TYPO", "unknown order 'TYPO'")])
def test_draw_orders_into_no_file_or_with_an_unknown_order_is_one_line(odd_paths, capsys, png,
                                                                       order, message):
    before = snapshot(odd_paths)
    fails(capsys, train.main, ["--draw-orders", str(odd_paths / png), "--img-size", "16",
                               "--patch", "4", "--order", order], message)
    assert snapshot(odd_paths) == before


def test_draw_orders_makes_its_folder(tmp_path):
    train.main(["--draw-orders", str(tmp_path / "new" / "d.png"), "--img-size", "16", "--patch",
                "4"])
    assert os.listdir(tmp_path / "new") == ["d.png"]


# ---- 7. damaged Fashion-MNIST files -------------------------------------------------------------

def idx(array):
    """MNIST's IDX bytes of a uint8 array."""
    return bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape) \
        + array.astype(np.uint8).tobytes()


IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


@pytest.mark.parametrize("damage,file,message", [
    ("not gzip", IMAGES, "BadGzipFile"), ("truncated gzip", IMAGES, "EOFError"),
    ("a bad header", LABELS, "its header or its size is wrong"),
    ("too few bytes", IMAGES, "its header or its size is wrong"),
    ("fewer labels than images", LABELS, "do not hold n images of 28 x 28 and their n labels"),
    ("a label of 10", LABELS, "labels 0..9"), ("a FIFO", LABELS, "not a regular file")])
def test_a_damaged_fashion_mnist_file_is_one_line_naming_it(tmp_path, capsys, damage, file,
                                                            message):
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28))
    labels = np.arange(64) % 10
    files = {IMAGES: gzip.compress(idx(images)), LABELS: gzip.compress(idx(labels))}
    files.update({name.replace("train", "t10k"): content for name, content in files.items()})
    files[file] = {"not gzip": b"plain text", "truncated gzip": files[file][:1000],
                   "a bad header": gzip.compress(b"\0\0\x09" + idx(labels)[3:]),
                   "too few bytes": gzip.compress(idx(images)[:-1]),
                   "fewer labels than images": gzip.compress(idx(labels[:63])),
                   "a label of 10": gzip.compress(idx(labels + 1)), "a FIFO": None}[damage]
    root = tmp_path / "fm"
    root.mkdir()
    for name, content in files.items():
        os.mkfifo(root / name) if content is None else (root / name).write_bytes(content)
    for main, argv in [(train.main, ["--data", "fashion-mnist", "--root", str(root), "--epochs",
                                     "1", "--batch-size", "8", "--out", str(tmp_path / "run")]),
                       (prior.main, ["--data", "fashion-mnist", "--root", str(root), "--out",
                                     str(tmp_path / "p.json")])]:
        with deadline(60):
            assert file in fails(capsys, main, argv, message)
    assert sorted(os.listdir(tmp_path)) == ["fm"] and len(os.listdir(root)) == 4


# ---- 8. image folders: only regular files opened, no link to a folder followed -------------------

@contextmanager
def deadline(seconds):
    """A TimeoutError instead of a hang (SIGALRM interrupts a blocking open)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_is_skipped_and_a_link_loop_not_followed_in_an_image_folder(tmp_path, capsys):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cat, dog = tmp_path / "train" / "cat", tmp_path / "train" / "dog"
    os.mkfifo(cat / "fifo.png")  # opening it blocks until someone writes
    os.symlink("..", dog / "loop")  # dog/loop/dog/loop/...: 40 levels of dogs
    os.symlink(tmp_path / "nowhere.png", dog / "dangling.png")
    os.symlink(cat / "0.png", dog / "a-link-to-a-cat.png")  # a link to an image: read
    with deadline(60):
        dataset = data.build_dataset("folder", str(tmp_path), "train", 16)
        labels = [dataset[i][1] for i in range(len(dataset))]
    assert labels == [0, 0, 0, 1, 1, 1, 1]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: skipping {cat / 'fifo.png'} (not a regular file)",
        f"warning: skipping {dog / 'dangling.png'} (not a regular file)",
        f"warning: skipping {dog / 'loop'} (a link to a folder)"]
    with deadline(120):
        assert prior.main(["--data", "folder", "--root", str(tmp_path), "--img-size", "16",
                           "--patch", "4", "--codebook", "4", "--workers", "1",
                           "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["images"] == 7


def test_a_fifo_among_cifar_batches_is_one_line(tmp_path, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    os.mkfifo(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    with deadline(60):
        fails(capsys, train.main, ["--data", "cifar10", "--root", str(tmp_path), "--out",
                                   str(tmp_path / "run")], "data_batch_1 is not a regular file")


# ---- 9. the minor ones --------------------------------------------------------------------------

def test_resume_takes_the_start_order_from_the_checkpoint_not_from_the_file(tmp_path):
    path = tmp_path / "order.pt"
    data.save_order(str(path), reorder.order("spiral", 4, 4), (4, 4))
    out = str(tmp_path / "run")
    train.main([*TINY, "--order", str(path), "--out", out, "--epochs", "1"])
    path.unlink()  # gone: --resume (here: of a finished run) does not need it
    summary = train.main([*TINY, "--order", str(path), "--out", out, "--epochs", "1", "--resume"])
    assert torch.equal(summary["order"], reorder.order("spiral", 4, 4))


@pytest.mark.parametrize("call,message", [
    (lambda: reorder.grid_size(32.0, 4), "must be positive integers"),
    (lambda: reorder.grid_size(32, -4), "must be positive integers"),
    (lambda: reorder.grid_size((32, 32, 3), 4), "must be positive integers"),
    (lambda: reorder.triangle_tau(0, 0, 0.2), "at least one step, got steps=0"),
    (lambda: reorder.ViT(reorder.vit_config("tiny", img_size=16, patch_size=4))(
        torch.zeros(3, 16, 16)), "a batch [B, C, H, W]), got shape [3, 16, 16]")])
def test_bad_arguments_to_the_api_are_one_line_value_errors(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_atomic_path_neither_follows_nor_replaces_what_is_at_its_temporary_name(tmp_path):
    victim, path = tmp_path / "victim.txt", tmp_path / "out.json"
    victim.write_text("the user's")
    for planted in (lambda tmp: tmp.symlink_to(victim), lambda tmp: tmp.write_text("theirs")):
        planted(tmp_path / "out.json.tmp")
        before = snapshot(tmp_path)
        with pytest.raises(data.UsageError, match="out.json.tmp"):
            with data.atomic_path(str(path), "w") as f:
                f.write("ours")
        assert snapshot(tmp_path) == before
        os.remove(tmp_path / "out.json.tmp")


# ---- 10. requests that cannot fit, absurd numbers, start-up (issue 32.5) ------------------------

FLOATS = ("lr", "policy-lr", "weight-decay", "clip", "tau-max", "fixed-tau")
INTS = ("subset", "val-subset", "img-size", "patch", "workers", "dim", "depth", "heads", "window",
        "prior-n", "policy-start", "policy-epochs", "orders-per-step", "epochs", "batch-size",
        "warmup-epochs", "seed", "save-every")


def test_the_float_flags_are_those_tested_below(monkeypatch):
    monkeypatch.setattr(train, "settle", lambda args, error: args)
    defaults = vars(train.parse_args([]))
    assert {k for k, v in defaults.items() if isinstance(v, float)} == {
        flag.replace("-", "_") for flag in FLOATS}


@pytest.mark.parametrize("value", ["1e300", "-1e300", "1e-300", "3.5e38", "nan", "-inf"])
@pytest.mark.parametrize("flag", FLOATS)
def test_every_float_flag_beyond_float32s_reach_is_one_line(tmp_path, capsys, flag, value):
    fails(capsys, train.main, [*TINY, "--learn-order", "--out", str(tmp_path / "run"),
                               f"--{flag}={value}"], f"argument --{flag}: must be")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag", INTS)
def test_every_int_flag_beyond_int64_is_one_line(tmp_path, capsys, flag):
    fails(capsys, train.main, [*TINY, "--learn-order", "--out", str(tmp_path / "run"),
                               f"--{flag}", str(10 ** 400)], f"argument --{flag}: must be")
    assert os.listdir(tmp_path) == []


def test_numbers_at_the_edges_of_their_size():
    real, whole = data.number(), data.number(int)
    assert [real(t) for t in ("1e30", "-1e30", "1e-30", "-1e-30", "0")] == [
        1e30, -1e30, 1e-30, -1e-30, 0]
    assert str(real("-0.0")) == "0.0" and whole(str(2 ** 63 - 1)) == 2 ** 63 - 1
    for parse, text in [(real, "1.0000001e30"), (real, "-1.0000001e30"), (real, "9.999999e-31"),
                        (whole, str(2 ** 63)), (whole, str(-2 ** 63))]:
        with pytest.raises(argparse.ArgumentTypeError, match="in size"):
            parse(text)


def test_lr_times_weight_decay_above_1_would_flip_the_weights_and_is_one_line(tmp_path, capsys):
    assert train.parse_args(["--lr", "0.5", "--weight-decay", "2"]).weight_decay == 2  # 1 - 1 = 0
    fails(capsys, train.main, [*TINY, "--out", str(tmp_path / "run"), "--lr", "0.5",
                               "--weight-decay", "2.01"], "exceeds 1: AdamW multiplies")
    assert os.listdir(tmp_path) == []


def test_workers_beyond_the_cores_are_one_line_before_any_fork(tmp_path, capsys):
    assert train.parse_args(["--workers", str(data.CORES)]).workers == data.CORES
    for main, argv in [(train.main, [*TINY, "--out", str(tmp_path / "run")]),
                       (prior.main, [*PRIOR, "--out", str(tmp_path / "p.json")])]:
        fails(capsys, main, [*argv, "--workers", str(data.CORES + 1)],
              f"--workers: must be at most {data.CORES} (the cores this process may run on)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra,term", [
    (["--subset", str(10 ** 15)], "the images' index (--subset)"),
    (["--dim", str(10 ** 9), "--heads", "1"], "the weights (--dim"),
    (["--depth", str(10 ** 14)], "a step's activations"),
    (["--img-size", str(10 ** 8), "--patch", "1"], "a step's activations"),
    (["--img-size", str(10 ** 9), "--patch", str(10 ** 9)], "the weights (--dim"),
    (["--batch-size", str(10 ** 15)], "a step's activations"),
    (["--learn-order", "--orders-per-step", str(10 ** 14)], "the orders sampled a step"),
    (["--learn-order", "--orders-per-step", str(10 ** 13), "--granularity", "image"],
     "the orders sampled a step")])
def test_a_run_that_cannot_fit_in_memory_is_one_line_before_anything_is_built(
        tmp_path, capsys, monkeypatch, extra, term):
    monkeypatch.setattr(data, "build_dataset", lambda *a, **k: pytest.fail("data built first"))
    monkeypatch.setattr(reorder, "ViT", lambda *a: pytest.fail("model built first"))
    err = fails(capsys, train.main, [*TINY, "--out", str(tmp_path / "run"), *extra],
                "this run needs at least")
    assert "GiB of RAM, which has" in err and f"most for {term}" in err
    assert os.listdir(tmp_path) == []


def test_the_memory_estimate_puts_the_model_on_the_gpu_and_counts_what_the_run_uses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: argparse.Namespace(total_memory=2 ** 30))

    def check(*extra, device="cuda"):
        args = train.parse_args([*TINY, *extra])
        train.check_memory(args, reorder.vit_config(args.model, img_size=args.img_size,
                                                    patch_size=args.patch, dim=args.dim,
                                                    depth=args.depth), torch.device(device))
    big = ["--dim", "2048", "--depth", "2", "--heads", "1"]  # 16 x 2048 x 45,088 bytes: 1.4 GiB
    with pytest.raises(data.UsageError, match="GiB of the GPU, which has 1 GiB: most for the w"):
        check(*big)
    check(*big, device="cpu")  # RAM holds it
    check("--subset", str(10 ** 7))  # 80 MB of index: RAM, not the GPU's 1 GiB
    with pytest.raises(data.UsageError, match="GiB of RAM, which has"):
        check("--subset", str(10 ** 15))
    check("--data", "fashion-mnist", "--subset", str(10 ** 15))  # at most its 60,000 files
    check("--orders-per-step", str(10 ** 14))  # K orders are drawn only while learning
    check("--learn-order", "--orders-per-step", str(10 ** 5))  # 77 MB: K x 16 patches
    with pytest.raises(data.UsageError, match="GiB of the GPU.*most for the orders sampled"):
        check("--learn-order", "--orders-per-step", str(10 ** 5), "--granularity", "image")


@pytest.mark.parametrize("mixer", reorder.MIXERS)
def test_the_memory_estimate_is_at_most_what_a_step_holds(monkeypatch, mixer):
    # what autograd keeps for the backward pass, and 16 bytes a weight (AdamW's state, gradients)
    args = train.parse_args([*TINY, "--mixer", mixer, "--dim", "64"])
    cfg = reorder.vit_config("tiny", img_size=16, patch_size=4, dim=64, depth=1, heads=2,
                             mixer=mixer)
    model, kept = reorder.ViT(cfg), {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(args.batch_size, 3, 16, 16))
    holds = sum(kept.values()) + 16 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(os, "sysconf", lambda name: 0)  # no RAM: the error says the estimate
    with pytest.raises(data.UsageError) as e:
        train.check_memory(args, cfg, torch.device("cpu"))
    estimate = float(str(e.value).split("needs at least ")[1].split(" GiB")[0]) * 2 ** 30
    assert holds / 4 < estimate <= 1.005 * holds  # 3 digits printed; bimamba keeps 2.4x


def test_ctrl_c_while_starting_is_one_line_status_130_and_nothing_written(tmp_path, capsys,
                                                                           monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "build_dataset", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--out", str(tmp_path / "run")])
    assert e.value.code == 130 and capsys.readouterr().err == train.STOPPED + "\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_while_train_py_imports_is_one_line_and_status_130(tmp_path):
    (tmp_path / "tqdm.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    done = subprocess.run([sys.executable, os.path.abspath(train.__file__), *TINY, "--out",
                           str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path),
                               "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300,
                          # Ctrl-C's default also where pytest runs with SIGINT ignored (started in
                          # the background by a script), which Python would otherwise keep
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == train.STOPPED and os.listdir(tmp_path) == ["tqdm.py"]


@pytest.mark.parametrize("task", ["pairs", "neighbours", "majority"])
@pytest.mark.parametrize("size,rows", [(4, 1), (12, 3)])
def test_a_pairs_task_on_too_few_or_odd_patch_rows_is_one_line(tmp_path, capsys, task, size,
                                                              rows):
    fails(capsys, train.main, [*TINY, "--data", task, "--img-size", str(size), "--patch", "4",
                               "--out", str(tmp_path / "run")],
          f"needs a multiple of 2 patch rows, got {rows}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["a read-only folder", "under a file"])
def test_no_fashion_mnist_and_nowhere_to_download_it_is_one_line(tmp_path, capsys, monkeypatch,
                                                                where):
    root = tmp_path / "empty"
    if where == "a read-only folder":  # root ignores permissions: mkdtemp refuses as it would
        def read_only(*args, dir=None, **kwargs):
            raise PermissionError(13, "Permission denied", os.path.join(dir, ".download-x"))
        monkeypatch.setattr(data.tempfile, "mkdtemp", read_only)
        root.mkdir()
    else:
        (tmp_path / "afile").write_text("a file")
        root = tmp_path / "afile" / "fm"
    before = snapshot(tmp_path)
    for main, argv in [(train.main, [*TINY, "--out", str(tmp_path / "run")]),
                       (prior.main, [*PRIOR, "--out", str(tmp_path / "p.json")])]:
        fails(capsys, main, [*argv, "--data", "fashion-mnist", "--root", str(root)],
              "is not in " + str(root) + " and could not be downloaded (")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("field,value,message", [
    ("heads", 0, "'heads': 0"), ("heads", -3, "'heads': -3"), ("dim", 0, "'width': 0"),
    ("depth", 0, "'depth': 0"), ("dim", 192.0, "'width': 192.0"), ("heads", 5, "not divisible")])
def test_a_vit_config_of_no_size_is_a_one_line_value_error(field, value, message):
    with pytest.raises(ValueError) as e:
        reorder.ViT(reorder.ViTConfig(**{field: value}))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mixer", ["mamba", "bimamba"])
def test_a_scan_takes_any_width_its_unused_heads_do_not_divide(tmp_path, mixer):
    assert reorder.ViT(reorder.ViTConfig(mixer=mixer, dim=16, depth=1, heads=0)).cfg.dim == 16
    args = train.parse_args([*TINY, "--mixer", mixer, "--dim", "16", "--heads", "3", "--out",
                             str(tmp_path / "run")])
    assert train.check_inputs(args, torch.device("cpu"))[2].cfg.heads == 3
    assert os.listdir(tmp_path) == []


def test_the_priors_bigram_symbols_tell_every_pair_of_codes_apart(monkeypatch):
    # a codebook of K - 1 in the symbol c0 * K + c1 made pairs collide, unnoticed (issue 32)
    k = 3
    codes = np.array([(a, b) for a in range(k) for b in range(k)]).ravel()  # each pair once
    bigrams = np.frombuffer(prior.streams(codes, k)[1], dtype=np.uint8)
    assert sorted(bigrams.tolist()) == list(range(k * k))
    seen, streams = [], prior.streams
    monkeypatch.setattr(prior, "streams", lambda c, size: seen.append((c.max(), size)) or
                        streams(c, size))
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    table = prior.compressibility(images, 4, codebook=5, workers=1, progress=False)
    assert {size for _, size in seen} == {table["codebook"]} == {5}
    assert max(code for code, _ in seen) == 4  # every code below the codebook's size


def test_draw_orders_past_256_patches_a_side_is_one_line_before_any_order_is_made(
        tmp_path, capsys, monkeypatch):
    class Reached(Exception):
        """reorder.order called: the grid was accepted."""

    def reached(*args, **kwargs):
        raise Reached
    monkeypatch.setattr(reorder, "order", reached)
    png = str(tmp_path / "d.png")
    with pytest.raises(Reached):
        train.main(["--draw-orders", png, "--img-size", "256", "--patch", "1"])
    for size in ("257", str(10 ** 18)):
        fails(capsys, train.main, ["--draw-orders", png, "--img-size", size, "--patch", "1"],
              f"at most 256 patches a side, got {size} x {size}")
    assert os.listdir(tmp_path) == []


def test_the_memory_estimate_of_a_small_run_by_hand(monkeypatch):
    # TINY: width 32 (hidden 128), 1 layer, 4 x 4 patches of 4 x 4 pixels, batch 16, 1 order, 128
    # synthetic images. Weights 16 x 32 x ((2 x 128 + 3 x 32) x 1 + 16 + 16) = 196,608 bytes;
    # activations 4 x 16 x 16 x (16 + 4 x 128 x 1) = 540,672; orders 48 x 16 = 768; the index
    # 8 x 128 = 1,024: 739,072 bytes, 0.000688 GiB
    args = train.parse_args(TINY)
    monkeypatch.setattr(os, "sysconf", lambda name: 0)  # no RAM: the error says the estimate
    with pytest.raises(data.UsageError, match=r"needs at least 0\.000688 GiB of RAM"):
        train.check_memory(args, reorder.vit_config("tiny", img_size=16, patch_size=4, dim=32,
                                                    depth=1), torch.device("cpu"))
