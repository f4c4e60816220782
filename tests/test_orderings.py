"""§3 orderings: exact sequences, permutations on any grid, a continuous generalized Hilbert."""
import pytest
import torch

from reorder import ORDERS, ViT, check_perm, grid_size, order, patchify, permute, vit_config

EXACT_4x4 = {
    "row": list(range(16)),
    "column": [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15],
    "hilbert": [0, 4, 5, 1, 2, 3, 7, 6, 10, 11, 15, 14, 13, 9, 8, 12],
    "spiral": [0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9],
    "diagonal": [12, 8, 13, 4, 9, 14, 0, 5, 10, 15, 1, 6, 11, 2, 7, 3],
    "snake": [0, 1, 4, 8, 5, 2, 3, 6, 9, 12, 13, 10, 7, 11, 14, 15],
}

# 2 x 3 (ids 0 1 2 / 3 4 5), worked out by hand from the definitions: catches h/w mix-ups
EXACT_2x3 = {
    "row": [0, 1, 2, 3, 4, 5],
    "column": [0, 3, 1, 4, 2, 5],
    "spiral": [0, 1, 2, 5, 4, 3],
    "diagonal": [3, 0, 4, 1, 5, 2],
    "snake": [0, 1, 3, 4, 2, 5],
}

# 3 x 2 (ids 0 1 / 2 3 / 4 5), taller than wide, also by hand
EXACT_3x2 = {
    "row": [0, 1, 2, 3, 4, 5],
    "column": [0, 2, 4, 1, 3, 5],
    "spiral": [0, 1, 3, 5, 4, 2],
    "diagonal": [4, 2, 5, 0, 3, 1],
    "snake": [0, 1, 2, 4, 3, 5],
}


@pytest.mark.parametrize("name", ORDERS)
def test_exact_4x4_sequences(name):
    assert order(name, 4, 4).tolist() == EXACT_4x4[name]


@pytest.mark.parametrize("name", sorted(EXACT_2x3))
def test_exact_2x3_and_3x2_sequences(name):
    assert order(name, 2, 3).tolist() == EXACT_2x3[name]
    assert order(name, 3, 2).tolist() == EXACT_3x2[name]


SORT_KEYS = {  # PAPER.md §3's definitions as sort keys of the cells (r, c)
    "column": lambda r, c: (c, r),
    "diagonal": lambda r, c: (c - r, r),  # diagonals c - r upwards, each walked down
    "snake": lambda r, c: (r + c, c if (r + c) % 2 == 0 else -c),
}


@pytest.mark.parametrize("name", sorted(SORT_KEYS))
def test_orderings_equal_their_definitions_on_every_grid_up_to_7x7(name):
    for h in range(1, 8):  # wide and tall grids alike
        for w in range(1, 8):
            cells = sorted(((r, c) for r in range(h) for c in range(w)),
                           key=lambda rc: SORT_KEYS[name](*rc))
            assert order(name, h, w).tolist() == [r * w + c for r, c in cells], (h, w)


def test_permute_puts_patch_perm_k_at_slot_k():
    # spiral is not its own inverse: applying argsort(perm) instead of perm would show here
    perm = order("spiral", 4, 4)
    assert not torch.equal(perm.argsort(), perm)
    tokens = torch.arange(16.0)[None, :, None].expand(3, 16, 2)  # token i holds its patch id i
    assert permute(tokens, perm)[:, :, 0].tolist() == [perm.tolist()] * 3
    perms = torch.stack([perm, order("diagonal", 4, 4), perm.flip(0)])  # one order per image
    assert permute(tokens, perms)[:, :, 1].tolist() == perms.tolist()


@pytest.mark.parametrize("mixer", ["window", "bimamba"])
def test_the_model_reads_patch_perm_k_at_slot_k(mixer):
    # the first block's input: slot k holds patch perm[k]'s embedding (CLS apart), for one order
    # and for one order per image
    torch.manual_seed(0)
    model = ViT(vit_config("tiny", img_size=16, patch_size=4, dim=8, heads=2, depth=1,
                           mixer=mixer))
    images = torch.randn(2, 3, 16, 16)
    patches = model.patch_embed(patchify(images, 4)) + model.pos_embed  # [B, N, D] by patch id
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda block, x: seen.append(x[0]))
    first = 0 if model.cls_last else 1
    for perm in (order("spiral", 4, 4), torch.stack([order("hilbert", 4, 4),
                                                     order("diagonal", 4, 4)])):
        model(images, perm)
        rows = perm.expand(2, 16)
        want = torch.stack([patches[b, rows[b]] for b in range(2)])
        assert torch.equal(seen[-1][:, first:first + 16], want)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (7, 1), (3, 5), (14, 14), (13, 17), (2, 9)])
@pytest.mark.parametrize("name", ORDERS + ("random",))
def test_every_ordering_is_a_permutation(name, h, w):
    perm = order(name, h, w)
    assert perm.dtype == torch.long
    assert sorted(perm.tolist()) == list(range(h * w))


def test_random_order_depends_on_seed_only():
    assert torch.equal(order("random", 5, 6, seed=3), order("random", 5, 6, seed=3))
    assert not torch.equal(order("random", 5, 6, seed=3), order("random", 5, 6, seed=4))


def standard_hilbert(n):
    """The textbook d -> (x, y) Hilbert curve on an n x n grid (n a power of two), written
    independently."""
    cells = []
    for d in range(n * n):
        x = y = 0
        t = d
        s = 1
        while s < n:
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        cells.append((x, y))
    return cells


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_hilbert_equals_standard_curve_on_power_of_two_squares(n):
    # the paper's released code: the standard curve with its x coordinate read as the row
    expected = [x * n + y for x, y in standard_hilbert(n)]
    perm = order("hilbert", n, n).tolist()
    assert perm == expected
    assert perm[0] == 0 and perm[-1] == (n - 1) * n  # top-left to bottom-left


def test_hilbert_8x8_first_steps():
    assert order("hilbert", 8, 8)[:8].tolist() == [0, 1, 9, 8, 16, 24, 25, 17]


def test_hilbert_steps_between_neighbours_on_every_grid_up_to_20():
    for h in range(1, 21):
        for w in range(1, 21):
            perm = order("hilbert", h, w)
            r, c = perm // w, perm % w
            dr, dc = (r[1:] - r[:-1]).abs(), (c[1:] - c[:-1]).abs()
            assert bool((torch.maximum(dr, dc) == 1).all()), (h, w)  # never a jump, never a repeat
            diagonal = int(((dr == 1) & (dc == 1)).sum())
            assert diagonal <= 1, (h, w, diagonal)
            if h % 2 == w % 2:  # only odd x even grids may need a diagonal step
                assert diagonal == 0, (h, w)


def test_unknown_order_lists_valid_names():
    names = "row, column, hilbert, spiral, diagonal, snake"
    with pytest.raises(ValueError, match=f"unknown order 'zigzag'.*{names}"):
        order("zigzag", 4, 4)


def test_bad_grid_and_image_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="at least 1 x 1"):
        order("row", 0, 4)
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by patch size 4") as e:
        grid_size(30, 4)
    assert "\n" not in str(e.value)
    assert grid_size((32, 48), 16) == (2, 3)


def test_a_grid_of_non_integers_is_named_as_such():
    for h, w in ((3.0, 4), (3, "4")):
        with pytest.raises(ValueError, match="grid sizes must be integers"):
            order("row", h, w)


def test_check_perm_rejects_non_permutations():
    assert torch.equal(check_perm(order("snake", 3, 3), 9), order("snake", 3, 3))
    with pytest.raises(ValueError, match="not a permutation"):
        check_perm(torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        check_perm(torch.arange(3), 4)
    for wrong in (torch.arange(4.0), torch.arange(4, dtype=torch.int32)):  # not a LongTensor
        with pytest.raises(ValueError, match="LongTensor"):
            check_perm(wrong, 4)
    assert check_perm(torch.stack([order("row", 2, 2)] * 6).view(2, 3, 4), 4).shape == (2, 3, 4)
