"""Windowed attention against a dense reference; the ViT's order (in)variance; vendoring."""
import ast
import os
import shutil
import subprocess
import sys

import pytest
import torch

import reorder
from reorder import PRESETS, ViT, banded_attention, order, vit_config, window_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_reference(q, k, v, window):
    """Softmax attention with an explicit mask: CLS row and column global, tokens ±window."""
    L = q.shape[-2]
    pos = torch.arange(L)
    near = (pos[:, None] - pos[None, :]).abs() <= window
    allowed = near | (pos[:, None] == 0) | (pos[None, :] == 0)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def qkv(n, seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n + 1, d, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("n,window,chunk", [
    (1, 0, None), (5, 1, None), (33, 3, None), (100, 7, None), (197, 7, None), (196, 7, 7),
    (301, 0, None), (300, 64, None), (257, 5, 9), (130, 16, 40), (64, 20, 20), (31, 30, None),
])
def test_banded_attention_equals_dense_reference(n, window, chunk):
    q, k, v = qkv(n, seed=n + window)
    grad_out = torch.randn(2, 3, n + 1, 8)
    ref = dense_reference(q, k, v, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    out = banded_attention(q, k, v, window, chunk)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        # fp32, 1e-5 at unit scale: CLS's value gradient sums over all N tokens (|g| ~ 20 here) in
        # another order than the reference does, so the bound scales with the largest entry
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("n,window", [(50, 3), (300, 7), (600, 20), (40, None)])
def test_window_attention_dispatch_equals_reference(n, window):
    q, k, v = qkv(n, seed=7)
    out = window_attention(q, k, v, window)
    ref = dense_reference(q, k, v, n if window is None else window)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def small_vit(window, **kw):
    torch.manual_seed(0)
    cfg = vit_config("tiny", img_size=(16, 20), patch_size=4, dim=32, depth=2, heads=2,
                     window=window, **kw)
    return ViT(cfg).eval()


def test_full_attention_is_invariant_to_the_order():
    model, x = small_vit(None), torch.randn(3, 3, 16, 20)
    base = model(x, order("row", 4, 5))
    for name in ("column", "hilbert", "spiral", "diagonal", "snake", "random"):
        assert torch.allclose(model(x, order(name, 4, 5)), base, atol=1e-5)
    assert torch.allclose(model(x), base, atol=1e-5)


def test_windowed_attention_depends_on_the_order():
    x = torch.randn(3, 3, 16, 20)

    def order_effect(model):  # relative change of the output from row to spiral order
        row = model(x, order("row", 4, 5))
        return ((row - model(x, order("spiral", 4, 5))).abs().max() / row.abs().max()).item()

    # at initialisation the effect is small but far above float noise (all that full attention
    # shows)
    assert order_effect(small_vit(1)) > 100 * max(order_effect(small_vit(None)), 1e-7)


def test_per_image_permutations_equal_one_image_at_a_time():
    model, x = small_vit(2), torch.randn(3, 3, 16, 20)
    perms = torch.stack([order(name, 4, 5) for name in ("hilbert", "snake", "column")])
    batched = model(x, perms)
    single = torch.cat([model(x[i:i + 1], perms[i]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_one_step(preset):
    torch.manual_seed(0)
    model = ViT(vit_config(preset, img_size=16, patch_size=4, num_classes=5, window=2))
    assert model.cfg.dim == PRESETS[preset]["dim"]
    logits = model(torch.randn(2, 3, 16, 16), order("hilbert", 4, 4))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_base_preset_is_the_papers_size():
    cfg = vit_config("base")
    assert (cfg.dim, cfg.depth, cfg.heads) == (768, 12, 12)


def test_bad_model_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ViT(vit_config("tiny", img_size=30, patch_size=4))
    with pytest.raises(ValueError, match="window must be >= 0"):
        ViT(vit_config("tiny", window=-1))
    with pytest.raises(ValueError, match="unknown model"):
        vit_config("huge")
    with pytest.raises(ValueError, match="expects images of 3x16x20"):
        small_vit(2)(torch.randn(1, 3, 16, 16))


def test_forward_takes_only_permutations_of_its_patches():
    model, x = small_vit(2), torch.randn(2, 3, 16, 20)
    row = order("row", 4, 5)
    for bad, message in ((row[:-1], "shape"), (torch.cat([row[:-1], row[:1]]), "not a permutation"),
                         (row - 1, "not a permutation"), (row[None], "one per image"),
                         (torch.stack([row] * 3), "one per image")):
        with pytest.raises(ValueError, match=message):
            model(x, bad)


def test_reorder_imports_only_torch_and_the_standard_library():
    tree = ast.parse(open(os.path.join(ROOT, "reorder.py")).read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules - set(sys.stdlib_module_names) == {"torch"}


@pytest.mark.slow
def test_reorder_runs_alone_in_an_empty_folder(tmp_path):
    shutil.copy(os.path.join(ROOT, "reorder.py"), tmp_path)
    (tmp_path / "use.py").write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I adds no folder\n"
        "import torch, reorder\n"
        "model = reorder.ViT(reorder.vit_config('tiny', depth=1, window=3))\n"
        "policy = reorder.PlackettLuce.from_order(reorder.order('hilbert', *model.grid))\n"
        "perm, logp = policy.sample(2, 0.2)\n"
        "logits = model(torch.randn(2, 3, 32, 32), perm)\n"
        "print(tuple(logits.shape), bool(torch.isfinite(logp).all()))\n")
    out = subprocess.run([sys.executable, "-I", str(tmp_path / "use.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "(2, 10) True"
