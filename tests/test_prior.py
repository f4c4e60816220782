"""§4 compressibility prior: known answers, determinism, bad input."""
import json
import os

import numpy as np
import pytest
import torch

import prior
import reorder
import train

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def stripes(n, size=32, vertical=False, seed=0):
    """Images whose rows (or columns) are constant, of random grey levels."""
    levels = torch.rand(n, 1, size, 1, generator=torch.Generator().manual_seed(seed))
    images = levels.expand(n, 1, size, size)
    return images.transpose(-1, -2) if vertical else images


def measure(images, **kw):
    return prior.compressibility(images, 4, workers=1, progress=False, **kw)["orders"]


def test_lzma_payload_excludes_the_chunk_framing():
    for n in (1, 64, 70000, 200000):  # one stored chunk, and several
        data = np.random.default_rng(n).bytes(n)
        assert prior.payload_bytes(data) == n  # incompressible: stored as is, framing not counted
    assert prior.payload_bytes(bytes(4096)) < 64


def test_streams_are_unigram_bytes_and_non_overlapping_bigram_symbols():
    uni, bi = prior.streams(np.array([1, 2, 3, 4, 5]), 10)
    assert uni == bytes([1, 2, 3, 4, 5])
    assert bi == bytes([12, 34])  # (1 2)(3 4) as 1*10+2, 3*10+4; the odd last code is left out
    uni, bi = prior.streams(np.array([255, 1]), 256)
    assert uni == bytes([255, 1]) and bi == (255 * 256 + 1).to_bytes(2, "little")


def test_each_image_is_scored_on_its_own_unigram_and_bigram_stream_in_each_order():
    # the compression of each stream, computed by hand, in its column: unigram 0, bigram 1
    rng = np.random.default_rng(0)
    codes = np.repeat(rng.integers(0, 16, (2, 8)), 8, axis=1)  # [2 images, 64]: runs of 8
    perms = np.stack([np.arange(64), reorder.order("spiral", 8, 8).numpy()])
    got = prior.score_images((codes, perms, 16, 6))
    for i, j in np.ndindex(2, 2):
        for s, stream in enumerate(prior.streams(codes[i][perms[j]], 16)):
            assert got[i, j, s] == 100.0 * (1.0 - prior.payload_bytes(stream) / len(stream))
    assert (got[:, :, 0] != got[:, :, 1]).all()  # the two columns are told apart


def test_the_table_is_the_mean_standard_error_and_rank_of_the_image_scores(monkeypatch):
    # scores per image [4 images, 3 orders, 2 streams], fabricated: each column is its mean plus
    # (0, 0, 0, 4) (unigram) or (0, 0, 0, 8) (bigram), whose standard errors are exactly 1 and 2
    means = np.array([[10.0, 40.0], [20.0, 20.0], [30.0, 24.0]])  # a, b, c; scores 25, 20, 27
    spread = np.array([0.0, 0.0, 0.0, 1.0])[:, None, None] * np.array([4.0, 8.0])
    scores = iter(means - spread.mean(0) + spread)  # one image after another
    monkeypatch.setattr(prior, "score_images", lambda job: np.stack([next(scores) for _ in job[0]]))
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    orders = {name: torch.arange(4) for name in "abc"}
    table = prior.compressibility(images, 4, orders, codebook=4, workers=1, progress=False)
    rows = table["orders"]
    for name, (uni, bi) in zip("abc", means):
        assert rows[name]["unigram"] == pytest.approx(uni, rel=1e-12)
        assert rows[name]["bigram"] == pytest.approx(bi, rel=1e-12)
        assert rows[name]["score"] == pytest.approx((uni + bi) / 2, rel=1e-12)
        assert rows[name]["unigram_se"] == pytest.approx(1.0, rel=1e-12)
        assert rows[name]["bigram_se"] == pytest.approx(2.0, rel=1e-12)
    # 1 = most compressible by the mean of both streams (by unigram alone: c, b, a)
    assert [rows[name]["rank"] for name in "abc"] == [2, 3, 1]
    assert prior.pick(table) == "b"


def test_kmeans_finds_every_distinct_point_even_from_a_duplicated_start():
    # 4 distinct vectors, 25 copies each: most seeds start two centres on copies of one vector,
    # leaving a cluster empty; it must be re-seeded at the point worst served, and the centres
    # must be the means (here the vectors themselves)
    distinct = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]])
    points = distinct.repeat(25, 1)
    for seed in range(5):
        centres = prior.fit_codebook(points, 4, seed=seed)
        assert sorted(centres.tolist()) == sorted(distinct.tolist()), seed
    noise = torch.rand(200, 2, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(prior.fit_codebook(noise, 8, seed=0),
                           prior.fit_codebook(noise, 8, seed=1))  # the seed is used


def test_encode_gives_the_nearest_code_across_blocks():
    codebook = 10.0 * torch.eye(4)
    idx = torch.randint(4, (3, 7), generator=torch.Generator().manual_seed(0))
    vectors = codebook[idx] + torch.rand(3, 7, 4, generator=torch.Generator().manual_seed(1))
    for block in (65536, 5, 1):  # 21 vectors: one block, several with a short last one, one each
        assert torch.equal(prior.encode(vectors, codebook, block=block), idx)


def test_stripes_compress_best_in_the_order_that_repeats_whole_lines():
    # LZMA codes a repeat of a whole earlier line as one match. With rows constant, every column is
    # the same, so column order is one column followed by exact copies of it; row order is a run per
    # row, one match each. Constant columns reverse it. (A transposed patchify or an inverted
    # permutation swaps the two.)
    horizontal, vertical = measure(stripes(100)), measure(stripes(100, vertical=True))
    for stream in ("unigram", "bigram"):
        gap = 5 * (horizontal["column"][f"{stream}_se"] + horizontal["row"][f"{stream}_se"])
        assert horizontal["column"][stream] > horizontal["row"][stream] + gap
        gap = 5 * (vertical["column"][f"{stream}_se"] + vertical["row"][f"{stream}_se"])
        assert vertical["row"][stream] > vertical["column"][stream] + gap


def test_codes_are_read_in_the_order_perm_not_its_inverse():
    # constant patches whose level changes every 8 slots of the spiral (spiral is not its own
    # inverse): read in spiral order the codes run in 8 runs of 8; in argsort(spiral) they do not
    spiral = reorder.order("spiral", 8, 8)
    g = torch.Generator().manual_seed(0)
    levels = torch.randperm(16, generator=g)[torch.randint(16, (60, 8), generator=g)] / 15.0
    patches = torch.empty(60, 64)
    patches[:, spiral] = levels.repeat_interleave(8, dim=1)  # slot k of the spiral: level k // 8
    images = patches.view(60, 1, 8, 1, 8, 1).expand(60, 1, 8, 4, 8, 4).reshape(60, 1, 32, 32)
    table = measure(images, codebook=16, orders={"spiral": spiral, "inverse": spiral.argsort()})
    for stream in ("unigram", "bigram"):
        gap = 5 * (table["spiral"][f"{stream}_se"] + table["inverse"][f"{stream}_se"])
        assert table["spiral"][stream] > table["inverse"][stream] + gap, stream


def test_constant_images_compress_far_better_than_noise_which_scores_zero():
    noise = measure(torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    constant = measure(torch.rand(64, 1, 1, 1).expand(64, 1, 32, 32))
    for name in noise:
        assert abs(noise[name]["unigram"]) < 0.5 and abs(noise[name]["bigram"]) < 0.5
        assert constant[name]["unigram"] > 80 and constant[name]["bigram"] > 80


def test_rgb_images_and_a_custom_order_work():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 24, generator=g)
    table = prior.compressibility(images, 4, orders={"mine": torch.arange(24).flip(0)}, codebook=32,
                                  workers=1, progress=False)
    assert table["grid"] == [4, 6] and list(table["orders"]) == ["mine"]


def test_pick_is_the_least_compressible_order_and_none_in_a_tie():
    scores = {"row": 30.0, "snake": 10.0, "column": 20.0}
    table = {"orders": {name: {"score": score} for name, score in scores.items()}}
    assert prior.pick(table) == "snake"
    table["orders"]["row"]["score"] = 10.0
    assert prior.pick(table) is None


def test_a_tie_is_called_a_tie_by_prior_py_and_by_order_prior(tmp_path, capsys):
    out = tmp_path / "p.json"  # one code for every patch: every ordering writes the same stream
    assert prior.main(["--data", "synthetic", "--n", "16", "--img-size", "16", "--codebook", "1",
                       "--workers", "1", "--out", str(out)]) == 0
    assert "a tie" in capsys.readouterr().out and json.loads(out.read_text())["pick"] is None
    from PIL import Image
    for split in ("train", "val"):  # constant images: every ordering of one is the same
        for c, level in (("dark", 40), ("light", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (level,) * 3).save(tmp_path / split / c / "0.jpg")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "folder", "--root", str(tmp_path), "--order", "prior", "--epochs",
                    "1", "--batch-size", "2", "--depth", "1", "--quiet",
                    "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "a tie" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def run_cli(tmp_path, folder, *extra):
    (tmp_path / folder).mkdir()
    out = tmp_path / folder / "prior.json"
    code = prior.main(["--data", "synthetic", "--n", "48", "--img-size", "16", "--patch", "4",
                       "--codebook", "32", "--out", str(out), *extra])
    return code, out


def test_same_seed_gives_identical_json_for_any_number_of_workers(tmp_path):
    code1, a = run_cli(tmp_path, "a", "--workers", "1")
    first = a.read_bytes()
    a.unlink(), a.parent.rmdir()
    code3, _ = run_cli(tmp_path, "a", "--workers", "1")  # the same command again
    code2, b = run_cli(tmp_path, "b", "--workers", "2")
    assert code1 == code2 == code3 == 0
    assert a.read_bytes() == first
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    for j in (ja, jb):
        j["config"].pop("out"), j["config"].pop("workers")
    assert ja == jb


@pytest.mark.parametrize("args,message", [
    (["--data", "synthetic", "--n", "0"], "argument --n: must be at least 1"),
    (["--data", "synthetic", "--img-size", "30", "--patch", "4"],
     "image size 30x30 is not divisible by patch size 4"),
    (["--data", "folder", "--root", "/nonexistent/place"],
     "data folder /nonexistent/place/train not found"),
    (["--data", "synthetic", "--codebook", "0"], "argument --codebook: must be at least 1, got 0"),
    (["--data", "synthetic", "--codebook", "-3"], "argument --codebook: must be at least 1, got -3"),
    (["--data", "synthetic", "--workers", "0"], "argument --workers: must be at least 1"),
    (["--data", "synthetic", "--order-file", "row"], "--order-file row is given twice or names a"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    try:
        code = prior.main(args + ["--out", str(tmp_path / "x.json")])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_out_is_checked_before_the_computation_and_its_folder_made(tmp_path, capsys, monkeypatch):
    real = prior.compressibility
    monkeypatch.setattr(prior, "compressibility", lambda *a, **k: pytest.fail("computed first"))
    (tmp_path / "file").write_text("")
    args = ["--data", "synthetic", "--n", "16", "--img-size", "16", "--codebook", "4"]
    assert prior.main(args + ["--out", str(tmp_path / "file" / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "is a file, not a folder" in err and err.count("\n") == 1
    monkeypatch.setattr(prior, "compressibility", real)
    assert prior.main(args + ["--workers", "1", "--out", str(tmp_path / "new" / "p.json")]) == 0
    assert json.loads((tmp_path / "new" / "p.json").read_text())["images"] == 16
    assert os.listdir(tmp_path / "new") == ["p.json"]


def test_an_empty_folder_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    out = str(tmp_path / "x.json")
    assert prior.main(["--data", "folder", "--root", str(tmp_path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no images in" in err and err.count("\n") == 1


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Debian's dataset-fashion-mnist is missing")
def test_fashion_mnist_prior_runs(tmp_path, capsys):
    out = str(tmp_path / "p.json")
    assert prior.main(["--data", "fashion-mnist", "--n", "200", "--out", out]) == 0
    table = json.loads((tmp_path / "p.json").read_text())
    assert sorted(table["orders"]) == sorted(prior.reorder.ORDERS) and table["images"] == 200
    assert table["pick"] in table["orders"]
    assert "start the policy from:" in capsys.readouterr().out
