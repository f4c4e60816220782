"""The known-answer task (train.py --data pairs): its labels, its pairing order, its slot distance."""
import json
import os

import pytest
import torch

import reorder
import train


def read_bits(image, patch):
    """Each patch's bit back from its pixels: 0 if its upper half is the bright one."""
    h = image.shape[-2] // patch
    cells = image[0].reshape(h, patch, -1, patch).permute(0, 2, 1, 3)  # [h, w, p, p]
    return (cells[:, :, : patch // 2].mean((-1, -2)) < cells[:, :, patch // 2:].mean((-1, -2))).long()


@pytest.mark.parametrize("size,patch", [(32, 4), (24, 6), (16, 2)])
def test_label_says_whether_the_bottom_half_repeats_the_top_half(size, patch):
    data = train.PairImages(200, size, patch, noise=0.0)
    h, w = data.grid
    for i in range(len(data)):
        image, label = data[i]
        bits = read_bits(image, patch)
        assert torch.equal(bits, data.bits(i)[0])
        mismatched = int((bits[: h // 2] != bits[h // 2:]).sum())
        assert mismatched == (h // 2 * w // 2 if label else 0)
        # a patch's mean carries nothing (the patch embedding's LayerNorm would remove it)
        cells = image[0].reshape(h, patch, w, patch).mean((1, 3))
        assert cells.abs().max() < 1e-6


def test_classes_are_balanced_and_each_half_alone_is_uniform():
    data = train.PairImages(2000, 32, 4)
    bits, labels = zip(*(data.bits(i)[:2] for i in range(len(data))))
    bits, labels = torch.stack(bits).float(), torch.tensor(labels)
    assert abs(labels.float().mean() - 0.5) < 0.04
    for label in (0, 1):  # no class can be told from the bright/dark count of one half
        for half in (bits[labels == label, :4], bits[labels == label, 4:]):
            assert abs(half.mean() - 0.5) < 0.02


def test_horizontal_flip_keeps_the_label():
    data = train.PairImages(50, 32, 4, noise=0.0)
    for i in range(len(data)):
        image, label = data[i]
        flipped = read_bits(image.flip(-1), 4)
        assert torch.equal(flipped, data.bits(i)[0].flip(-1))
        assert int((flipped[:4] != flipped[4:]).any()) == label


def test_pair_order_puts_partners_side_by_side_and_row_major_far_apart():
    for h, w in [(8, 8), (2, 3), (6, 4)]:
        pairing = reorder.check_perm(train.pair_order(h, w), h * w)
        assert train.pair_distance(pairing, h, w) == 1.0
        assert train.pair_distance(reorder.order("row", h, w), h, w) == h // 2 * w
        assert train.pair_distance(reorder.order("column", h, w), h, w) == h // 2
    # 2 x 3: (0,0) (1,0) (0,1) (1,1) (0,2) (1,2)
    assert train.pair_order(2, 3).tolist() == [0, 3, 1, 4, 2, 5]


def test_odd_number_of_patch_rows_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "pairs", "--img-size", "12", "--patch", "4", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs an even number of patch rows, got 3" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_pairs_trains_with_the_pairing_order_from_a_file(tmp_path):
    path = str(tmp_path / "pairs.pt")
    train.save_order(path, train.pair_order(4, 4), (4, 4))
    summary = train.main(["--data", "pairs", "--subset", "64", "--val-subset", "32", "--batch-size", "16",
                          "--img-size", "16", "--patch", "4", "--depth", "1", "--dim", "32", "--heads", "2",
                          "--window", "1", "--epochs", "1", "--order", path, "--quiet", "--out", str(tmp_path / "run")])
    with open(os.path.join(summary["out"], "config.json")) as f:
        config = json.load(f)
    assert config["vit"]["num_classes"] == 2 and config["vit"]["in_chans"] == 1
    assert torch.equal(summary["order"], train.pair_order(4, 4))
