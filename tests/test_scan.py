"""reorder.selective_scan, its torch path and reorder_triton's kernels (run on the CPU by Triton's
interpreter), against the recurrence written out slot by slot: outputs and all six gradients."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import reorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scan_reference(x, dt, A, B, C, D):
    """Δ = softplus(dt), h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t · h_t + D x_t, one
    slot at a time in float32, autograd for the gradients; core k of A [n, E, S] reads rows
    k R / n .. (k + 1) R / n - 1."""
    R, L, E = x.shape
    A, D = (A[None], D[None]) if A.dim() == 2 else (A, D)
    core = torch.arange(R) // (R // len(A))
    A, D = A.float()[core], D.float()[core]  # [R, E, S], [R, E]
    x, dt, B, C = x.float(), F.softplus(dt.float()), B.float(), C.float()
    h, ys = x.new_zeros(R, E, A.shape[-1]), []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None]
        ys.append((h * C[:, t, None]).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1)


def scan_inputs(R, L, E, S, cores, dtype=torch.float32, seed=0):
    """x, dt, A, B, C, D with gradients; A [E, S] and D [E] for cores=None, else [cores, ...].
    Δ from about 0.01 to 2.5 and A from -2.1 to -0.1: decays from nearly 1 to nearly 0."""
    g = torch.Generator().manual_seed(seed)
    core = () if cores is None else (cores,)
    x, dt = torch.randn(R, L, E, generator=g), torch.randn(R, L, E, generator=g) * 2 - 1
    A = -0.1 - 2 * torch.rand(*core, E, S, generator=g)
    B, C = torch.randn(R, L, S, generator=g), torch.randn(R, L, S, generator=g)
    D = torch.randn(*core, E, generator=g)
    return [t.to(dtype).requires_grad_() for t in (x, dt, A, B, C, D)]


def assert_scan_equals_reference(scan, inputs):
    """Same y and the same six gradients as scan_reference on the same inputs. y is float32 on
    both sides: 1e-5 of its largest entry. Gradients come back in the inputs' dtype: for float32
    1e-5 of the largest entry; for bfloat16 also one bfloat16 rounding (2^-8 relative, twice)."""
    y, want = scan(*inputs), scan_reference(*inputs)
    assert y.dtype == torch.float32 and y.shape == want.shape
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, inputs, grad_y)
    want_grads = torch.autograd.grad(want, inputs, grad_y)
    rounding = 2 ** -7 if inputs[0].dtype == torch.bfloat16 else 0
    for name, got, expected in zip(("y", "x", "dt", "A", "B", "C", "D"), (y, *grads),
                                   (want, *want_grads)):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        got, expected = got.float(), expected.float()
        bound = 1e-5 * expected.abs().max().clamp(min=1e-30) + rounding * expected.abs()
        assert ((got - expected).abs() <= bound).all(), (name, (got - expected).abs().max())


# R rows, L slots, E channels, S states, cores (None: A [E, S]), chunk: L = 1, L a multiple of the
# chunk and not, S not a power of two, one, two and four cores
CASES = [(2, 1, 3, 4, None, 16), (3, 17, 7, 16, None, 16), (8, 40, 6, 3, 4, 16),
         (4, 23, 5, 16, 2, 4), (2, 32, 4, 4, 1, 16), (4, 9, 3, 2, 4, 1)]


@pytest.mark.parametrize("R,L,E,S,cores,chunk", CASES)
def test_torch_scan_equals_the_recurrence_slot_by_slot(R, L, E, S, cores, chunk):
    assert_scan_equals_reference(
        lambda *t: reorder.selective_scan(*t, backend="torch", chunk=chunk),
        scan_inputs(R, L, E, S, cores, seed=L))


@pytest.mark.parametrize("cores", [None, 4])
def test_torch_scan_takes_bfloat16_inputs(cores):
    # the reference gets the same bfloat16 inputs, upcast: only the gradients' rounding differs
    assert_scan_equals_reference(lambda *t: reorder.selective_scan(*t, backend="torch"),
                                 scan_inputs(4, 21, 5, 16, cores, torch.bfloat16))


def test_scan_is_finite_and_exact_at_16384_slots():
    # Δ from 2e-9 (remember for ever) to 20 (forget at once, a = e^-20 and less)
    g = torch.Generator().manual_seed(0)
    n = 16384
    x, dt = torch.randn(1, n, 3, generator=g), torch.rand(1, n, 3, generator=g) * 40 - 20
    B, C = torch.randn(1, n, 2, generator=g), torch.randn(1, n, 2, generator=g)
    A, D = -torch.tensor([[1.0, 0.5], [1.0, 1e-3], [2.0, 1.0]]), torch.ones(3)
    with torch.no_grad():
        got = reorder.selective_scan(x, dt, A, B, C, D, backend="torch")
        want = scan_reference(x, dt, A, B, C, D)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_scan_keeps_its_inputs_and_one_state_per_chunk_for_backward():
    # O(R L E) memory: besides its inputs, only the state before each chunk, [R, L / T, E, S]
    x, dt, A, B, C, D = scan_inputs(2, 40, 8, 16, None)
    inputs = {t.untyped_storage().data_ptr() for t in (x, dt, A, B, C, D)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reorder.selective_scan(x, dt, A, B, C, D, backend="torch", chunk=16)
    assert sum(saved.values()) == 2 * 3 * 8 * 16 * 4  # 3 chunks of 16 slots, float32


# R, L, E, S, cores, chunk, SCAN_BLOCK, blocks: of one row and a third of the channels (E = 6 cut
# 2, 2, 2; E = 7 cut 3, 3, 1), of two rows within a core, one of all rows across four cores; L not
# a multiple of the chunk
BLOCK_CASES = [(8, 23, 6, 4, 4, 5, 48, 24), (4, 17, 7, 4, 2, 4, 40, 12),
               (8, 40, 3, 2, 2, 16, 256, 4), (8, 9, 3, 2, 4, 4, 200, 1)]


@pytest.mark.parametrize("R,L,E,S,cores,chunk,block,blocks", BLOCK_CASES)
def test_torch_scan_in_blocks_equals_the_recurrence(monkeypatch, R, L, E, S, cores, chunk, block,
                                                    blocks):
    monkeypatch.setattr(reorder, "SCAN_BLOCK", block)
    assert len(reorder._blocks(R, E, S, chunk)) == blocks
    assert_scan_equals_reference(
        lambda *t: reorder.selective_scan(*t, backend="torch", chunk=chunk),
        scan_inputs(R, L, E, S, cores, seed=L))


@pytest.mark.parametrize("R,E,S,T,block", [(256, 64, 16, 16, 2 ** 17), (8, 768, 16, 16, 2 ** 17),
                                            (1, 192, 16, 42, 2 ** 17), (5, 7, 3, 4, 40),
                                            (3, 5, 2, 100, 64), (7, 1, 1, 1, 3)])
def test_blocks_tile_rows_and_channels_within_the_budget(monkeypatch, R, E, S, T, block):
    monkeypatch.setattr(reorder, "SCAN_BLOCK", block)
    cover = torch.zeros(R, E, dtype=torch.int)
    for rows, channels in reorder._blocks(R, E, S, T):
        cover[rows, channels] += 1
        entries = len(range(R)[rows]) * T * len(range(E)[channels]) * S
        assert entries <= max(block, T * S), (rows, channels)  # one channel of a row at least
    assert (cover == 1).all()


def test_default_chunk_keeps_its_memory_budget_and_the_recurrence(monkeypatch):
    # by default a chunk is 16 slots, or longer where all rows' chunk fits one block: the states
    # kept for backward are at most x's size times S / 16 (plus one chunk), whatever the rows
    monkeypatch.setattr(reorder, "SCAN_BLOCK", 2 ** 10)
    for R, L, E, S, cores in ((2, 100, 4, 4, None), (8, 50, 3, 2, 4), (4, 40, 8, 16, 2)):
        inputs = scan_inputs(R, L, E, S, cores, seed=R)
        kept = {t.untyped_storage().data_ptr() for t in inputs}
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in kept:
                saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reorder.selective_scan(*inputs, backend="torch")
        chunk = max(16, 2 ** 10 // (R * E * S))  # 32, 21 and 16 slots
        assert [tuple(t.shape) for t in saved] == [(R, -(-L // chunk), E, S)]
        assert_scan_equals_reference(lambda *t: reorder.selective_scan(*t, backend="torch"),
                                     inputs)


def test_bad_backend_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = scan_inputs(1, 3, 2, 2, None)
    with pytest.raises(ValueError, match="unknown backend 'cuda': choose auto, torch or triton"):
        reorder.selective_scan(*inputs, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        reorder.selective_scan(*inputs, backend="triton")  # CPU tensors, no interpreter


# Triton reads TRITON_INTERPRET when triton.jit decorates a function, its own library's included,
# so the kernels' tests run in a process that has it from the start: the slow test below starts one
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 from the start (see below)")


# R, L, E, S, cores, the kernel's CHUNK and BLOCK_E: L = 1, L and E not multiples of the chunk
# and of the block, several chunks and blocks, S not a power of two, one, two and four cores
KERNEL_CASES = [(2, 1, 5, 4, None, 16, 32), (4, 10, 11, 3, 4, 4, 8), (2, 7, 9, 16, 2, 4, 4),
                (1, 20, 4, 2, 1, 16, 32)]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,L,E,S,cores,chunk,block", KERNEL_CASES)
def test_triton_scan_equals_the_recurrence_slot_by_slot(monkeypatch, dtype, R, L, E, S, cores,
                                                        chunk, block):
    kernels = pytest.importorskip("reorder_triton")
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    monkeypatch.setattr(kernels, "BLOCK_E", block)
    assert_scan_equals_reference(lambda *t: reorder.selective_scan(*t, backend="triton"),
                                 scan_inputs(R, L, E, S, cores, dtype, seed=L))


@interpreter
def test_triton_scan_keeps_small_steps_exact():
    # Δ = softplus(-14) ≈ 8e-7: log(1 + e^dt) in float32 would keep about one digit of it
    pytest.importorskip("reorder_triton")
    inputs = scan_inputs(2, 3, 4, 2, None)
    with torch.no_grad():
        inputs[1].sub_(14)
        inputs[5].zero_()  # y = C · h only, and h is proportional to Δ
    assert_scan_equals_reference(lambda *t: reorder.selective_scan(*t, backend="triton"), inputs)


@interpreter
def test_triton_scan_under_torch_compile_is_a_graph_break():
    pytest.importorskip("reorder_triton")
    # Dynamo does not trace into the kernels' launch: it runs them as they are, between graphs
    def layer(x, dt, A, B, C, D):
        return reorder.selective_scan(x.sin(), dt, A, B, C, D, backend="triton").cos()
    inputs = scan_inputs(2, 3, 4, 2, None)
    explained = torch._dynamo.explain(layer)(*inputs)
    assert explained.break_reasons and all("torch.compiler.disable" in r.reason
                                           for r in explained.break_reasons)
    got = torch.compile(layer, backend="eager")(*inputs)
    assert torch.allclose(got, layer(*inputs), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_reorder_alone_runs_the_torch_path_and_refuses_triton(tmp_path):
    shutil.copy(os.path.join(ROOT, "reorder.py"), tmp_path)  # without reorder_triton.py
    (tmp_path / "use.py").write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I adds no folder\n"
        "import torch, reorder\n"
        "x, dt, B, C = torch.randn(2, 5, 3), torch.randn(2, 5, 3), *torch.randn(2, 2, 5, 4)\n"
        "args = x, dt, -torch.rand(3, 4), B, C, torch.ones(3)\n"
        "print(tuple(reorder.selective_scan(*args).shape))\n"
        "try:\n"
        "    reorder.selective_scan(*args, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n")
    out = subprocess.run([sys.executable, "-I", str(tmp_path / "use.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "(2, 5, 3)", "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), triton and "
        "reorder_triton.py beside reorder.py"]


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.abspath(__file__), "-k", "triton_scan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"{2 * len(KERNEL_CASES) + 2} passed" in out.stdout.splitlines()[-1], out.stdout
