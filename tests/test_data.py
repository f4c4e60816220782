"""data.py: loaders on small files in the real formats, downloads, the known-answer task."""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import data
import prior
import reorder
import train

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


# ---- image data sets -----------------------------------------------------------------------------

def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


SMALL = ["--batch-size", "8", "--epochs", "1", "--depth", "1", "--dim", "32", "--heads", "2",
         "--quiet"]


def write_cifar(root, monkeypatch, n=4):
    """CIFAR-10's five training batches and its test batch, in the release's pickle format (only
    their MD5 sums, which torchvision checks, cannot match the release's)."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        pixels, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": labels.tolist()}, f)
        batches[name] = (pixels, labels.tolist())
    return batches


def test_cifar10_loader_reads_the_pickle_format(tmp_path, monkeypatch):
    batches = write_cifar(tmp_path, monkeypatch)
    dataset = data.build_dataset("cifar10", str(tmp_path), "train", 32)
    written, labels = batches["data_batch_1"]
    image, label = dataset[3]
    mean, std = (torch.tensor(v)[:, None, None] for v in data.MEAN_STD["cifar10"])
    pixels = torch.round((image * std + mean) * 255).to(torch.uint8)
    assert len(dataset) == 20 and label == labels[3]  # the first batch's 4th image
    # channels, rows, columns, in the pickle's order
    assert torch.equal(pixels, torch.from_numpy(written[3].reshape(3, 32, 32)))
    assert len(data.build_dataset("cifar10", str(tmp_path), "val", 32)) == 4
    summary = train.main(["--data", "cifar10", "--root", str(tmp_path), *SMALL,
                          "--out", str(tmp_path / "run")])
    assert len(metrics(summary["out"])) == 1


def write_jpegs(root, classes=("cat", "dog"), per_class=4, size=(40, 50)):
    """Images with constant rows: the prior's orderings compress them unequally (noise ties)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[0], 1, 3), dtype=np.uint8).repeat(size[1], 1)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")


def test_image_folder_loader_resizes_and_skips_unreadable_images(tmp_path, capsys):
    write_jpegs(tmp_path)
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    dataset = data.build_dataset("folder", str(tmp_path), "train", 32)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 9
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == 0
    summary = train.main(["--data", "folder", "--root", str(tmp_path), *SMALL,
                          "--batch-size", "3", "--workers", "0", "--out", str(tmp_path / "run")])
    assert len(metrics(summary["out"])) == 1
    assert "warning: skipping unreadable image" in capsys.readouterr().err


def test_an_image_too_large_for_pil_is_skipped_by_training_and_by_the_prior(tmp_path, capsys,
                                                                            monkeypatch):
    # issue 17, defect 7: PIL refuses an image over twice MAX_IMAGE_PIXELS (a big fMoW tile) with
    # DecompressionBombError, which is no OSError: it crashed train.py and prior.py
    from PIL import Image
    write_jpegs(tmp_path, size=(40, 50))
    Image.new("RGB", (120, 100)).save(tmp_path / "train" / "dog" / "huge.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 120 x 100 = 12,000 > 2 x 5,000
    out = tmp_path / "p.json"
    assert prior.main(["--data", "folder", "--root", str(tmp_path), "--n", "100", "--codebook", "4",
                       "--workers", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 8
    summary = train.main(["--data", "folder", "--root", str(tmp_path), *SMALL, "--batch-size", "3",
                          "--workers", "0", "--out", str(tmp_path / "run")])
    assert len(metrics(summary["out"])) == 1
    assert "skipping unreadable image" in capsys.readouterr().err


def test_unreadable_images_are_skipped_by_the_prior_and_by_training(tmp_path):
    write_jpegs(tmp_path)
    for path in (tmp_path / "train" / "dog" / "broken.jpg", tmp_path / "val" / "cat" / "bad.jpg"):
        path.write_bytes(b"not a jpeg at all")
    out = tmp_path / "p.json"
    assert prior.main(["--data", "folder", "--root", str(tmp_path), "--n", "100", "--codebook", "4",
                       "--workers", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 8  # the 8 readable ones
    # --order prior samples as prior.py does; at --batch-size 1 the bad image is a batch alone
    summary = train.main(["--data", "folder", "--root", str(tmp_path), *SMALL, "--batch-size", "1",
                          "--order", "prior", "--prior-n", "100", "--workers", "0",
                          "--out", str(tmp_path / "run")])
    assert len(metrics(summary["out"])) == 1


def test_a_folder_of_only_unreadable_images_is_one_error_line(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        for i in range(3):
            (tmp_path / split / "cat" / f"{i}.jpg").write_bytes(b"not a jpeg at all")
    for main in (lambda: train.main(["--data", "folder", "--root", str(tmp_path), *SMALL,
                                      "--batch-size", "2", "--out", str(tmp_path / "run")]),
                 lambda: sys.exit(prior.main(["--data", "folder", "--root", str(tmp_path),
                                              "--out", str(tmp_path / "p.json")]))):
        with pytest.raises(SystemExit) as e:
            main()
        *warnings, error = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and "no readable image" in error, error
        assert all(line.startswith("warning: skipping unreadable image") for line in warnings)
    assert sorted(os.listdir(tmp_path)) == ["train", "val"]


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Debian's dataset-fashion-mnist is missing")
def test_fashion_mnist_loader_reads_debians_files():
    train_set = data.build_dataset("fashion-mnist", None, "train", 32)
    val_set = data.build_dataset("fashion-mnist", None, "val", 32)
    assert len(train_set) == 60000 and len(val_set) == 10000
    image, label = train_set[0]
    mean, std = data.MEAN_STD["fashion-mnist"]
    pixels = image * std[0] + mean[0]
    assert image.shape == (1, 32, 32) and 0 <= label < 10
    assert pixels[:, :2].abs().max() < 1e-6 and pixels.max() > 0.5  # padded border, real content


def write_idx(path, array):
    """An IDX file as MNIST's are: zero bytes, dtype 0x08 (uint8), ndim, big-endian sizes, data."""
    import gzip
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_is_padded_to_32_pixels_and_keeps_its_own(tmp_path):
    images = np.random.default_rng(0).integers(1, 256, (3, 28, 28))
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([3, 1, 4]))
    image, label = data.build_dataset("fashion-mnist", str(tmp_path), "train", 32)[1]
    mean, std = data.MEAN_STD["fashion-mnist"]
    want = torch.zeros(32, 32)
    want[2:30, 2:30] = torch.tensor(images[1], dtype=torch.float) / 255  # 2 pixels each side
    assert label == 1 and torch.allclose(image[0] * std[0] + mean[0], want, rtol=0, atol=1e-6)


def test_flips_are_horizontal_half_of_them_and_new_each_epoch():
    images = data.SyntheticImages(64, 8)
    flipped = data.Flipped(images, seed=3)

    def flips(epoch):
        flipped.epoch, out = epoch, []
        for i in range(len(images)):
            (x, y), (x0, y0) = flipped[i], images[i]
            assert y == y0 and (torch.equal(x, x0) or torch.equal(x, x0.flip(-1)))
            out.append(not torch.equal(x, x0))
        return out
    first = flips(0)
    assert 16 < sum(first) < 48 and flips(1) != first and flips(0) == first


def test_a_subset_is_the_same_images_for_every_seed(tmp_path):
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((40, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(40) % 10)

    def kept(seed):
        return data.build_dataset("fashion-mnist", str(tmp_path), "train", 28, augment=True,
                                  seed=seed, subset=10).dataset.indices
    assert kept(1) == kept(2) and sorted(kept(1)) != list(range(10))


class FakeFashionMNIST:
    """torchvision.datasets.FashionMNIST's download, offline: writes the four IDX files into
    root/FashionMNIST/raw, as the real one does."""

    def __init__(self, root, download):
        raw = os.path.join(root, "FashionMNIST", "raw")
        os.makedirs(raw)
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 12), ("t10k", 5)):
            write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte.gz"),
                      rng.integers(0, 256, (n, 28, 28)))
            write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10)


def test_fashion_mnist_without_debians_package_is_downloaded_into_data(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "FMNIST_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    train_set = data.build_dataset("fashion-mnist", None, "train", 28)
    assert len(train_set) == 12 and len(data.build_dataset("fashion-mnist", None, "val", 28)) == 5
    assert train_set[3][1] == 3 and train_set[0][0].shape == (1, 28, 28)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary folder left beside it
    assert len(os.listdir(tmp_path / "data" / "FashionMNIST" / "raw")) == 4


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_a_failed_download_is_one_line_and_leaves_no_data_folder(tmp_path, monkeypatch, capsys,
                                                                 name):
    import torchvision

    def offline(root, download):
        os.makedirs(os.path.join(root, "partial"))  # what a real failed download leaves behind
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName not known")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "FMNIST_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", name, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "could not be downloaded (RuntimeError: Error downloading" in err
    assert os.listdir(tmp_path) == []


# ---- the known-answer task (--data pairs) -------------------------------------------------------

def read_bits(image, patch):
    """Each patch's bit back from its pixels: 0 if its upper half is the bright one."""
    h = image.shape[-2] // patch
    cells = image[0].reshape(h, patch, -1, patch).permute(0, 2, 1, 3)  # [h, w, p, p]
    upper, lower = cells[:, :, : patch // 2], cells[:, :, patch // 2:]
    return (upper.mean((-1, -2)) < lower.mean((-1, -2))).long()


@pytest.mark.parametrize("size,patch", [(32, 4), (24, 6), (16, 2)])
def test_label_says_whether_the_bottom_half_repeats_the_top_half(size, patch):
    task = data.PairImages(200, size, patch, noise=0.0)
    h, w = task.grid
    for i in range(len(task)):
        image, label = task[i]
        bits = read_bits(image, patch)
        assert torch.equal(bits, task.bits(i)[0])
        mismatched = int((bits[: h // 2] != bits[h // 2:]).sum())
        assert mismatched == (h // 2 * w // 2 if label else 0)
        # a patch's mean carries nothing (the patch embedding's LayerNorm would remove it)
        cells = image[0].reshape(h, patch, w, patch).mean((1, 3))
        assert cells.abs().max() < 1e-6


def test_neighbours_label_says_whether_each_even_row_is_inverted_in_the_row_below():
    task = data.base_dataset(data.build_dataset("neighbours", None, "val", 32))
    task.noise = 0.0
    for i in range(200):
        image, label = task[i]
        bits = read_bits(image, 4)
        assert int((bits[0::2] != bits[1::2]).sum()) == (32 if label else 0)
        # no counting shortcut: half of all patches dark, and half of the first patches, either label
        assert int(bits.sum()) == 32 and int(bits[0::2].sum()) == 16


def test_classes_are_balanced_and_each_half_alone_is_uniform():
    task = data.PairImages(2000, 32, 4)
    bits, labels = zip(*(task.bits(i)[:2] for i in range(len(task))))
    bits, labels = torch.stack(bits).float(), torch.tensor(labels)
    assert abs(labels.float().mean() - 0.5) < 0.04
    for label in (0, 1):  # no class can be told from the bright/dark count of one half
        for half in (bits[labels == label, :4], bits[labels == label, 4:]):
            assert abs(half.mean() - 0.5) < 0.02


def test_horizontal_flip_keeps_the_label():
    task = data.PairImages(50, 32, 4, noise=0.0)
    for i in range(len(task)):
        image, label = task[i]
        flipped = read_bits(image.flip(-1), 4)
        assert torch.equal(flipped, task.bits(i)[0].flip(-1))
        assert int((flipped[:4] != flipped[4:]).any()) == label


def test_pair_order_puts_partners_side_by_side_and_row_major_far_apart():
    for h, w in [(8, 8), (2, 3), (6, 4)]:
        pairing = reorder.check_perm(data.pair_order(h, w), h * w)
        assert data.pair_distance(pairing, h, w) == 1.0
        assert data.pair_distance(reorder.order("row", h, w), h, w) == h // 2 * w
        assert data.pair_distance(reorder.order("column", h, w), h, w) == h // 2
    # 2 x 3: (0,0) (1,0) (0,1) (1,1) (0,2) (1,2)
    assert data.pair_order(2, 3).tolist() == [0, 3, 1, 4, 2, 5]
    # neighbours on 4 x 2: rows 0 and 1, then rows 2 and 3
    assert data.pair_order(4, 2, gap=1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert data.pair_distance(reorder.order("row", 8, 8), 8, 8, gap=1) == 8
    assert data.pair_distance(reorder.order("column", 8, 8), 8, 8, gap=1) == 1


def test_majority_label_says_whether_most_pairs_differ_and_every_image_is_half_dark():
    task = data.base_dataset(data.build_dataset("majority", None, "val", 16))
    task.noise = 0.0
    assert task.grid == (4, 4) and len(task.pairs) == 8  # partners (r, c), (r + 2, c)
    labels = []
    for i in range(300):
        image, label = task[i]
        bits = read_bits(image, 4)
        assert torch.equal(bits, task.bits(i)[0])
        assert int((bits[:2] != bits[2:]).sum()) == (6 if label else 2)
        assert int(bits.sum()) == 8  # counting dark patches tells nothing
        labels.append(label)
    assert 0.4 < sum(labels) / len(labels) < 0.6
    # each image is made once, then the same tensor is given back
    assert task[3][0] is task[3][0]


def test_side_by_side_counts_the_partners_in_neighbouring_slots():
    pairs = data.pairs_of(4, 4, 2)
    assert data.side_by_side(reorder.order("column", 4, 4), pairs) == 0  # 2 slots apart
    assert data.side_by_side(data.pair_order(4, 4), pairs) == 8
    assert data.side_by_side(reorder.order("row", 4, 4), pairs) == 0  # 8 slots apart
    # column order with slots 1 and 2 of the first column swapped: 0 8 4 12 ...
    perm = torch.tensor([0, 8, 4, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15])
    assert data.side_by_side(perm, pairs) == 2
    assert data.slot_gaps(perm, pairs)[:4].tolist() == [1.0, 2.0, 2.0, 2.0]


def test_odd_number_of_patch_rows_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "pairs", "--img-size", "12", "--patch", "4",
                    "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "needs a multiple of 2 patch rows, got 3" in err
    assert not (tmp_path / "run").exists()


def test_pairs_trains_with_the_pairing_order_from_a_file(tmp_path):
    path = str(tmp_path / "pairs.pt")
    data.save_order(path, data.pair_order(4, 4), (4, 4))
    summary = train.main(["--data", "pairs", "--subset", "64", "--val-subset", "32", *SMALL,
                          "--batch-size", "16", "--img-size", "16", "--patch", "4", "--window", "1",
                          "--order", path, "--out", str(tmp_path / "run")])
    with open(os.path.join(summary["out"], "config.json")) as f:
        config = json.load(f)
    assert config["vit"]["num_classes"] == 2 and config["vit"]["in_chans"] == 1
    assert torch.equal(summary["order"], data.pair_order(4, 4))


def test_imports_run_one_way():
    """train -> prior -> data -> reorder, and train -> data: no module imports one above it."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = {"reorder", "data", "prior", "train"}
    imports = {}
    for name in ours:
        tree = ast.parse(open(os.path.join(root, f"{name}.py")).read())
        nodes = list(ast.walk(tree))
        found = {a.name for node in nodes if isinstance(node, ast.Import) for a in node.names}
        found |= {node.module for node in nodes if isinstance(node, ast.ImportFrom)}
        imports[name] = found & ours
    assert imports == {"reorder": set(), "data": {"reorder"}, "prior": {"data", "reorder"},
                       "train": {"data", "prior", "reorder"}}
