"""The mixers against references (dense masks, the Mamba layer written out slot by slot); order
(in)variance; vendoring. The selective scan itself: tests/test_scan.py."""
import ast
import os
import shutil
import subprocess
import sys

import pytest
import torch

import reorder
from reorder import (MIXERS, PRESETS, Attention, Mamba, ViT, banded_attention, order, vit_config,
                     window_attention)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_reference(q, k, v, window, causal=False):
    """Softmax attention with an explicit mask: CLS row and column global; tokens see ±window,
    or with `causal` themselves and the `window` before them."""
    L = q.shape[-2]
    pos = torch.arange(L)
    gap = pos[:, None] - pos[None, :]
    near = (gap >= 0) & (gap <= window) if causal else gap.abs() <= window
    allowed = near | (pos[:, None] == 0) | (pos[None, :] == 0)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def assert_same_with_gradients(fn, ref, inputs, seed=0):
    """fn(*inputs) equals ref(*inputs) in value and in the inputs' gradients, fp32: 1e-5 at unit
    scale (a gradient that sums over all N tokens in another order, as CLS's value gradient does,
    moves by more, so the bound scales with the largest entry)."""
    out, want = fn(*inputs), ref(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, inputs, grad_out)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    for got, expected in zip((out, *grads), (want, *want_grads)):
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


def qkv(n, seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n + 1, d, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("n,window,chunk", [
    (1, 0, None), (5, 1, None), (33, 3, None), (100, 7, None), (197, 7, None), (196, 7, 7),
    (301, 0, None), (300, 64, None), (257, 5, 9), (130, 16, 40), (64, 20, 20), (31, 30, None),
    (100, 9, 4),  # a chunk narrower than the window: widened to it
])
@pytest.mark.parametrize("causal", [False, True])
def test_banded_attention_equals_dense_reference(n, window, chunk, causal):
    assert_same_with_gradients(lambda q, k, v: banded_attention(q, k, v, window, causal, chunk),
                               lambda q, k, v: dense_reference(q, k, v, window, causal),
                               qkv(n, seed=n + window))


@pytest.mark.parametrize("n,window", [(1, None), (5, 0), (40, None), (197, 7), (300, None),
                                      (300, 7), (600, 20), (257, 100), (40, 38), (40, 39)])
def test_causal_attention_equals_dense_reference(n, window):
    # every path: the kernel's causal mask (None), dense masked (short), banded (long, narrow)
    assert_same_with_gradients(lambda q, k, v: window_attention(q, k, v, window, causal=True),
                               lambda q, k, v: dense_reference(q, k, v, n if window is None
                                                               else window, causal=True),
                               qkv(n, seed=n))


@pytest.mark.parametrize("n,window", [(50, 3), (300, 7), (600, 20), (40, None), (40, 38),
                                      (40, 39)])  # 38: the widest window short of all
def test_window_attention_dispatch_equals_reference(n, window):
    q, k, v = qkv(n, seed=7)
    out = window_attention(q, k, v, window)
    ref = dense_reference(q, k, v, n if window is None else window)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def core_reference(layer, d, u):
    """Scan core d of the layer on its input sequence u [B, L, E], slot by slot: causal conv,
    SiLU, (Δ, B, C), the recurrence, y_t = C_t · h_t + D u_t. Returns [B, L, E]."""
    B, L, E = u.shape
    k = layer.conv.weight.shape[-1]
    w, bias = layer.conv.weight[d * E:(d + 1) * E, 0], layer.conv.bias[d * E:(d + 1) * E]
    pad = torch.cat([u.new_zeros(B, k - 1, E), u], 1)
    u = torch.stack([bias + (pad[:, t:t + k] * w.T).sum(1) for t in range(L)], 1)
    u = torch.nn.functional.silu(u)
    dt, Bm, Cm = (u @ layer.x_proj[d]).split([layer.dt_rank, layer.d_state, layer.d_state], -1)
    dt = torch.nn.functional.softplus(dt @ layer.dt_proj[d] + layer.dt_bias[d])
    A = -torch.exp(layer.A_log[d])
    h, ys = torch.zeros(B, E, layer.d_state), []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None]
        ys.append((h * Cm[:, t, None]).sum(-1) + layer.D[d] * u[:, t])
    return torch.stack(ys, 1)


def mamba_reference(layer, x):
    """Mamba.forward written out: each core reads the tokens in its own order, given as a list of
    token indices (forward, backward, and for bimamba the first h*w tokens read down the columns
    of the grid, then the rest, and that backwards); its outputs go back to those tokens."""
    L = x.shape[1]
    u, z = layer.in_proj(x).chunk(2, dim=-1)
    orders = [list(range(L))]
    if len(layer.D) == 4:
        h, w = layer.grid
        columns = [r * w + c for c in range(w) for r in range(h)] + list(range(h * w, L))
        orders = [orders[0], orders[0][::-1], columns, columns[::-1]]
    y = 0
    for d, idx in enumerate(orders):
        y_d = core_reference(layer, d, u[:, idx])
        y = y + torch.stack([y_d[:, idx.index(i)] for i in range(L)], 1)  # token i's output
    return layer.out_proj(y / len(orders) * torch.nn.functional.silu(z))


@pytest.mark.parametrize("n", [1, 5, 40])
def test_mamba_layer_equals_its_recurrence_written_out(n):
    torch.manual_seed(n)
    layer = Mamba(16, d_state=4)
    x = torch.randn(2, n, 16, requires_grad=True)
    assert_same_with_gradients(layer, lambda x: mamba_reference(layer, x), (x,))


@pytest.mark.parametrize("grid,extra", [((3, 5), 1), ((4, 4), 1), ((1, 6), 1), ((5, 2), 0),
                                        ((2, 3), 2)])
def test_bimamba_equals_its_four_scans_written_out(grid, extra):
    # any h x w grid, with CLS (extra = 1) or without, held out at the end
    torch.manual_seed(grid[0] * 10 + grid[1])
    layer = Mamba(16, d_state=4, directions=4, grid=grid)
    with torch.no_grad():  # the four cores' parameters differ, so a swapped core would show
        layer.dt_bias.uniform_(-3, 0)
        layer.D.uniform_(0, 2)
    x = torch.randn(2, grid[0] * grid[1] + extra, 16, requires_grad=True)
    assert_same_with_gradients(layer, lambda x: mamba_reference(layer, x), (x,))


def test_bimamba_every_slot_reaches_every_other():
    torch.manual_seed(0)
    layer = Mamba(32, directions=4, grid=(4, 5))
    x = torch.randn(2, 21, 32)
    for slot in (0, 10, 20):
        y = x.clone()
        y[:, slot] += 1.0
        changed = (layer(x) - layer(y)).abs().amax(-1).min(0).values  # [21]
        assert (changed > 1e-6 * changed.max()).all(), (slot, changed)


@pytest.mark.parametrize("mixer,reach", [(Attention(32, 2, None, causal=True), 30),
                                         (Attention(32, 2, 3, causal=True), 4), (Mamba(32), 30)])
def test_causal_mixers_read_only_earlier_slots(mixer, reach):
    # a change at slot 12 reaches slots 12 .. 12 + reach - 1 and no other (slot 0 is CLS for
    # attention, global by design; a patch for mamba)
    torch.manual_seed(0)
    x = torch.randn(2, 30, 32)
    y = x.clone()
    y[:, 12] += 1.0
    first = 1 if isinstance(mixer, Attention) else 0
    changed = (mixer(x) - mixer(y)).abs().amax(-1).min(0).values  # [30]: least change per slot
    assert (changed[first:12] == 0).all() and (changed[12 + reach:] == 0).all()
    assert (changed[12:12 + reach] > 0).all()


def small_vit(window, mixer="window", **kw):
    torch.manual_seed(0)
    cfg = vit_config("tiny", img_size=(16, 20), patch_size=4, dim=32, heads=2, window=window,
                     mixer=mixer, **{"depth": 2, **kw})
    return ViT(cfg).eval()


def test_full_attention_is_invariant_to_the_order():
    model, x = small_vit(None), torch.randn(3, 3, 16, 20)
    base = model(x, order("row", 4, 5))
    for name in ("column", "hilbert", "spiral", "diagonal", "snake", "random"):
        assert torch.allclose(model(x, order(name, 4, 5)), base, atol=1e-5)
    assert torch.allclose(model(x), base, atol=1e-5)


@pytest.mark.parametrize("mixer,window,depth", [
    ("window", 1, 2), ("causal", None, 2), ("causal", 2, 2), ("mamba", None, 2),
    ("mamba", None, 1), ("bimamba", None, 2),
    # one block: CLS, read out last, is last in the forward and transposed scans, which read the
    # patches in the order's sequence (the flipped scans give it only itself)
    ("bimamba", None, 1)])
def test_every_order_sensitive_mixer_depends_on_the_order(mixer, window, depth):
    x = torch.randn(3, 3, 16, 20)

    def order_effect(model):  # relative change of the output from row to a shuffled order
        row = model(x, order("row", 4, 5))
        return ((row - model(x, order("random", 4, 5))).abs().max() / row.abs().max()).item()

    # at initialisation the effect is small but far above float noise, which is all that full
    # attention shows
    assert order_effect(small_vit(window, mixer, depth=depth)) > 100 * max(
        order_effect(small_vit(None, depth=depth)), 1e-7)


def test_mamba_reads_out_a_cls_token_that_has_seen_every_patch():
    # with CLS first, a forward scan would give the classifier no patch at all (a zero gradient)
    model = small_vit(None, "mamba")
    x = torch.randn(1, 3, 16, 20, requires_grad=True)
    perm = order("spiral", 4, 5)
    model(x, perm).sum().backward()
    for patch in (perm[0], perm[-1]):  # the first and the last patch of the sequence
        r, c = divmod(int(patch), 5)
        assert x.grad[..., 4 * r:4 * r + 4, 4 * c:4 * c + 4].abs().max() > 0


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_mixer_trains_one_step(preset, mixer):
    torch.manual_seed(0)
    model = ViT(vit_config(preset, img_size=16, patch_size=4, num_classes=5, window=2,
                           mixer=mixer, depth=1))  # the preset's width; one block is enough
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
    with pytest.raises(ValueError, match="unknown mixer 'rnn': choose one of window, causal"):
        ViT(vit_config("tiny", mixer="rnn"))
    with pytest.raises(ValueError, match="expects images of 3x16x20"):
        small_vit(2)(torch.randn(1, 3, 16, 16))


def test_forward_checks_only_the_shape_of_the_order():
    # the values are checked where orders enter (check_perm), not in every forward pass
    model, x = small_vit(2), torch.randn(2, 3, 16, 20)
    row = order("row", 4, 5)
    one_per_image = r"shape \[20\] or \[2, 20\]"
    for bad in (row[:-1], row.int(), row[None], torch.stack([row] * 3)):
        with pytest.raises(ValueError, match=one_per_image):
            model(x, bad)


@pytest.mark.parametrize("mixer", ["window", "bimamba"])
def test_forward_is_one_graph_for_torch_compile(mixer):
    # a data-dependent check (sort, host sync) in forward would break the graph; Dynamo's
    # tracing only, no compilation
    model = small_vit(2, mixer, depth=1)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 20), order("row", 4, 5))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons


@pytest.mark.parametrize("mixer", ["mamba", "bimamba"])
def test_mamba_init_reaches_every_later_slot(mixer):
    # mamba_ssm's init: a change to the first slot's patch reaches every later slot of the first
    # mixer's output, by > 2e-6 of the output's size (about 1e-5 at the far end; the ViT's std
    # 0.02 init on the layer's Linear weights gave about 1e-6 there, float noise is about 1e-7)
    torch.manual_seed(0)
    model = ViT(vit_config("tiny", mixer=mixer))  # 64 patches
    block = model.blocks[0]
    x = model.patch_embed(reorder.patchify(torch.randn(2, 3, 32, 32), 4)) + model.pos_embed
    x = torch.cat([x, model.cls_token.expand(2, -1, -1)], 1)
    y = x.clone()
    y[:, 0] = x.flip(0)[:, 0]  # the other image's patch
    with torch.no_grad():
        out = block.mix(block.norm1(x))
        changed = (out - block.mix(block.norm1(y))).abs().amax(-1).min(0).values  # [65]
    assert (changed[1:] > 2e-6 * out.abs().max()).all(), changed.min() / out.abs().max()


def test_reorder_imports_only_torch_and_the_standard_library():
    # and its optional fast paths, reorder_triton and reorder_cpu, inside a try that catches the
    # ImportError
    tree = ast.parse(open(os.path.join(ROOT, "reorder.py")).read())

    def imported(nodes):
        modules = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules.add(node.module.split(".")[0])
        return modules
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers):
            optional |= imported(n for stmt in node.body for n in ast.walk(stmt))
    assert optional == {"reorder_triton", "reorder_cpu"}
    assert imported(ast.walk(tree)) - set(sys.stdlib_module_names) - optional == {"torch"}


@pytest.mark.slow
def test_reorder_runs_alone_in_an_empty_folder(tmp_path):
    shutil.copy(os.path.join(ROOT, "reorder.py"), tmp_path)
    (tmp_path / "use.py").write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I adds no folder\n"
        "import torch, reorder\n"
        "policy = reorder.PlackettLuce.from_order(reorder.order('hilbert', 8, 8))\n"
        "perm, logp = policy.sample(2, 0.2)\n"
        "for mixer in reorder.MIXERS:\n"
        "    model = reorder.ViT(reorder.vit_config('tiny', depth=1, window=3, mixer=mixer))\n"
        "    logits = model(torch.randn(2, 3, 32, 32), perm)\n"
        "    print(mixer, tuple(logits.shape), bool(torch.isfinite(logp).all()))\n")
    out = subprocess.run([sys.executable, "-I", str(tmp_path / "use.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{m} (2, 10) True" for m in reorder.MIXERS]


@pytest.mark.slow
def test_bench_runs_at_tiny_sizes():
    # tests/bench.py is a script nothing else runs: every section once, at tiny sizes
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench.py"), "--tiny"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    for header in ("## attention", "## Mamba layers", "## the selective scan", "## page faults",
                   "## training throughput", "## a --learn-order step", "## prior.py",
                   "## the paper's size", "## loader", "## --resume's checks"):
        assert header in out.stdout, header
    assert "bimamba" in out.stdout
