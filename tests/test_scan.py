"""reorder.selective_scan, its torch path and reorder_triton's kernels (run on the CPU by Triton's
interpreter), against the recurrence written out slot by slot: outputs and all six gradients."""
import os
import shutil
import subprocess
import sys
import warnings

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


def cpu_backend(name):
    """name, the backends of CPU tensors ("torch" and "c"); skips where reorder_cpu's C loop does
    not compile here (no C compiler with OpenMP)."""
    if name == "c" and reorder._c_loop(torch.zeros(1)) is None:
        pytest.skip("reorder_cpu's C loop does not compile here")
    return name


CPU_BACKENDS = ["torch", "c"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("R,L,E,S,cores,chunk", CASES)
def test_torch_scan_equals_the_recurrence_slot_by_slot(backend, R, L, E, S, cores, chunk):
    backend = cpu_backend(backend)
    assert_scan_equals_reference(
        lambda *t: reorder.selective_scan(*t, backend=backend, chunk=chunk),
        scan_inputs(R, L, E, S, cores, seed=L))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cores", [None, 4])
def test_torch_scan_takes_bfloat16_inputs(backend, cores):
    # the reference gets the same bfloat16 inputs, upcast: only the gradients' rounding differs
    backend = cpu_backend(backend)
    assert_scan_equals_reference(lambda *t: reorder.selective_scan(*t, backend=backend),
                                 scan_inputs(4, 21, 5, 16, cores, torch.bfloat16))


@pytest.mark.parametrize("fails", ["compiler", "folder"])
def test_auto_runs_the_c_loop_on_cpu_and_the_torch_path_where_it_cannot_build(monkeypatch, fails):
    # the C loop where it builds; where the compiler or the temporary folder fails, one warning,
    # then the torch path
    cpu_backend("c")
    inputs, used = scan_inputs(4, 21, 5, 16, 2), []  # the C loop's tensors pass _pointers
    import reorder_cpu
    monkeypatch.setattr(reorder_cpu, "_pointers", lambda *t, f=reorder_cpu._pointers:
                        used.append(1) or f(*t))
    assert_scan_equals_reference(reorder.selective_scan, inputs)
    assert len(used) == 2  # forward and backward
    if fails == "compiler":
        monkeypatch.setenv("CC", "false")
    else:  # as where no temporary folder is writable
        monkeypatch.setattr(reorder_cpu.tempfile, "TemporaryDirectory", lambda **_: open("/"))
    reorder_cpu.lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the C scan .*torch path"):
            assert_scan_equals_reference(reorder.selective_scan, inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once a process: no second warning
            reorder.selective_scan(*inputs)
            with pytest.raises(ValueError, match="backend 'c' needs CPU tensors"):
                reorder.selective_scan(*inputs, backend="c")
        assert len(used) == 2
    finally:
        reorder_cpu.lib.cache_clear()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_is_finite_and_exact_at_16384_slots(backend):
    # Δ from 2e-9 (remember for ever) to 20 (forget at once, a = e^-20 and less)
    backend = cpu_backend(backend)
    g = torch.Generator().manual_seed(0)
    n = 16384
    x, dt = torch.randn(1, n, 3, generator=g), torch.rand(1, n, 3, generator=g) * 40 - 20
    B, C = torch.randn(1, n, 2, generator=g), torch.randn(1, n, 2, generator=g)
    A, D = -torch.tensor([[1.0, 0.5], [1.0, 1e-3], [2.0, 1.0]]), torch.ones(3)
    with torch.no_grad():
        got = reorder.selective_scan(x, dt, A, B, C, D, backend=backend)
        want = scan_reference(x, dt, A, B, C, D)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_keeps_its_inputs_and_one_state_per_chunk_for_backward(backend):
    # O(R L E) memory: besides its inputs, only the state before each chunk, [R, L / T, E, S]
    backend = cpu_backend(backend)
    x, dt, A, B, C, D = scan_inputs(2, 40, 8, 16, None)
    inputs = {t.untyped_storage().data_ptr() for t in (x, dt, A, B, C, D)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reorder.selective_scan(x, dt, A, B, C, D, backend=backend, chunk=16)
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
    with pytest.raises(ValueError, match="unknown backend 'cuda': choose auto, torch, triton or c"):
        reorder.selective_scan(*inputs, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        reorder.selective_scan(*inputs, backend="triton")  # CPU tensors, no interpreter


def spoil(name, value, cores=2):
    """scan_inputs(R=4, L=5, E=3, S=2, cores) with the input `name` replaced by `value`."""
    inputs = scan_inputs(4, 5, 3, 2, cores)
    inputs["x dt A B C D".split().index(name)] = value
    return inputs


# inputs selective_scan refuses (R = 4, L = 5, E = 3, S = 2, two cores unless said) and its line
FLOATS = "expected a float32, bfloat16, float16 or float64 tensor"
REFUSED = [
    (spoil("B", torch.zeros(4, 5, 3)), "B has shape [4, 5, 3], expected [R, L, S] = [4, 5, 2]"),
    (spoil("B", torch.zeros(1, 5, 2)), "B has shape [1, 5, 2], expected [R, L, S] = [4, 5, 2]"),
    (spoil("C", torch.zeros(4, 6, 2)), "C has shape [4, 6, 2], expected [R, L, S] = [4, 5, 2]"),
    (spoil("dt", torch.zeros(4, 5, 4)), "dt has shape [4, 5, 4], expected [R, L, E] = [4, 5, 3]"),
    (spoil("x", torch.zeros(4, 15)), "x has shape [4, 15], expected [R, L, E]"),
    (spoil("x", torch.zeros(4, 5, 3, 1)), "x has shape [4, 5, 3, 1], expected [R, L, E]"),
    (spoil("A", torch.zeros(2, 4, 2)), "A has shape [2, 4, 2], expected [n, E, S] = [2, 3, 2]"),
    (spoil("A", torch.zeros(1, 2), None), "A has shape [1, 2], expected [E, S] = [3, 2]"),
    (spoil("A", torch.zeros(2)), "A has shape [2], expected [E, S] or [n, E, S]"),
    (scan_inputs(3, 5, 3, 2, 2), "A has shape [2, 3, 2], expected n >= 1 cores that divide x's "
                                 "3 rows"),
    (scan_inputs(4, 5, 3, 2, 0), "A has shape [0, 3, 2], expected n >= 1 cores that divide x's "
                                 "4 rows"),
    (spoil("D", torch.zeros(1), None), "D has shape [1], expected [E] = [3]"),
    (spoil("D", torch.zeros(3)), "D has shape [3], expected [n, E] = [2, 3]"),
    (spoil("D", torch.zeros(2, 3, dtype=torch.long)), "D is torch.int64, " + FLOATS),
    (spoil("A", torch.zeros(2, 3, 2, dtype=torch.complex64)), "A is torch.complex64, " + FLOATS),
    (spoil("D", 1.0), "D is float, " + FLOATS),
    (spoil("B", torch.zeros(4, 5, 2, device="meta")), "B is on meta, x on cpu"),
]


@pytest.mark.parametrize("inputs,line", REFUSED)
def test_triton_scan_refuses_what_the_torch_path_refuses(inputs, line):
    # the check runs before either backend: on CPU tensors without the interpreter "triton"
    # would otherwise say it needs CUDA, and under it the kernels would read out of bounds
    for backend in ("torch", "triton", "c"):
        with pytest.raises(ValueError) as refused:
            reorder.selective_scan(*inputs, backend=backend)
        assert str(refused.value) == "selective_scan: " + line, backend


@pytest.mark.parametrize("R,L,E,S,cores", [(0, 3, 2, 2, None), (0, 3, 2, 2, 2), (2, 0, 3, 2, 2),
                                           (2, 3, 0, 2, None), (4, 3, 2, 0, 2), (2, 3, 2, 0, None)])
def test_triton_scan_handles_empty_sizes_as_the_torch_path(R, L, E, S, cores):
    # nothing to scan, or no state (S = 0: C_t · h_t is an empty sum): y = D x, and gradients
    # (zeros where y does not depend on an input) for every input, on both backends
    inputs = scan_inputs(R, L, E, S, cores)
    D = inputs[5] if cores else inputs[5][None]
    want = D.repeat_interleave(R // len(D), 0)[:, None] * inputs[0]
    grad_y = torch.randn(want.shape)
    want_grads = torch.autograd.grad(want, inputs, grad_y, allow_unused=True,
                                     materialize_grads=True)
    for backend in ("torch", "triton", "c"):
        y = reorder.selective_scan(*inputs, backend=backend)
        assert y.dtype == torch.float32 and torch.equal(y, want), backend
        for got, expected in zip(torch.autograd.grad(y, inputs, grad_y), want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# Triton reads TRITON_INTERPRET when triton.jit decorates a function, its own library's included,
# so the kernels' tests run in a process that has it from the start: the last test starts one
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs TRITON_INTERPRET=1 from the start (see below)")


# R, L, E, S, cores, the kernel's CHUNK and BLOCK_E: L = 1, L and E not multiples of the chunk
# and of the block, several chunks and blocks, S not a power of two, one, two and four cores
KERNEL_CASES = [(2, 1, 5, 4, None, 16, 32), (4, 10, 11, 3, 4, 4, 8), (2, 7, 9, 16, 2, 4, 4),
                (1, 20, 4, 2, 1, 16, 32), (4, 6, 9, 3, 2, 4, 8)]  # the last: 2 rows per core


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


def assert_same_values(got, want):
    """NaN and ±inf in the same places; the finite rest within 1e-5 of its row's largest."""
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    finite = want.isfinite()
    err = torch.where(finite, got - want, 0).abs().flatten(1).amax(1)
    assert (err <= 1e-5 * torch.where(finite, want, 0).abs().flatten(1).amax(1)).all()


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy's, in the interpreter
@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "grad_y"])
def test_triton_scan_carries_nan_and_inf_as_the_torch_path(monkeypatch, name):
    # E = 3 and S = 3 leave padding lanes in the kernels
    kernels = pytest.importorskip("reorder_triton")
    monkeypatch.setattr(kernels, "CHUNK", 2)
    monkeypatch.setattr(kernels, "BLOCK_E", 4)
    assert_carries_nan_and_inf_as_the_torch_path("triton", name)


@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "grad_y"])
def test_c_scan_carries_nan_and_inf_as_the_torch_path(name):
    # compiled with -ffast-math (for glibc's vector exp): NaN and inf still carried
    assert_carries_nan_and_inf_as_the_torch_path(cpu_backend("c"), name, chunk=2)


def assert_carries_nan_and_inf_as_the_torch_path(backend, name, chunk=None):
    """Row k (core k) holds the k-th value at slot 1 of input `name`, so each row's and core's
    outputs and gradients show one value's effect."""
    values = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30]
    inputs = scan_inputs(len(values), 3, 3, 3, len(values))
    grad_y = torch.randn(len(values), 3, 3)
    target = grad_y if name == "grad_y" else inputs["x dt A B C D".split().index(name)]
    with torch.no_grad():
        for k, value in enumerate(values):  # x, dt, grad_y [k, 1, 1]; A [k, 1, 1]; D [k, 1]
            target[k].view(-1)[target[k].shape[-1] + 1 if target.dim() == 3 else 1] = value
    y, want = (reorder.selective_scan(*inputs, backend=b, chunk=chunk) for b in (backend, "torch"))
    assert y.isnan().any() or name == "grad_y"  # the values are in place
    for got, expected in zip((y, *torch.autograd.grad(y, inputs, grad_y)),
                             (want, *torch.autograd.grad(want, inputs, grad_y))):
        assert_same_values(got, expected)


@interpreter
def test_triton_scan_takes_mixed_dtypes_strided_inputs_and_some_gradients():
    pytest.importorskip("reorder_triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, generator=g, dtype=torch.bfloat16).requires_grad_()
    dt = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)[..., ::2]  # every other channel
    A = (-torch.rand(3, 2, generator=g)).expand(2, 3, 2)  # the same A for two cores: stride 0
    B = torch.randn(2, 6, 4, generator=g).requires_grad_()  # read as B.transpose(0, 2)
    C = torch.randn(4, 6, 2, generator=g, dtype=torch.float16)
    D = torch.randn(2, 3, generator=g).requires_grad_()
    inputs, grad_y = (x, dt, A, B.transpose(0, 2), C, D), torch.randn(4, 6, 3, generator=g)
    y, want = (reorder.selective_scan(*inputs, backend=b) for b in ("triton", "torch"))
    assert (y - want).abs().max() <= 1e-5 * want.abs().max()
    for got, expected in zip(torch.autograd.grad(y, (x, B, D), grad_y),
                             torch.autograd.grad(want, (x, B, D), grad_y)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        got, expected = got.float(), expected.float()  # x's: a bfloat16 rounding apart at most
        bound = 1e-5 * expected.abs().max() + 2 ** -7 * expected.abs()
        assert ((got - expected).abs() <= bound).all()


@interpreter
def test_triton_scan_gives_each_program_its_own_scratch(monkeypatch):
    # The interpreter runs one program (r, block) at a time, so scratch shared between programs
    # changes no result on CPU (on a GPU they would race). What shows is where each one wrote:
    # after the backward pass, program (r, block)'s scratch holds the last chunk it walked, the
    # first: h_{-1} = 0, then h_0 .. h_{CHUNK-1} of row r and block's channels, 0 in the padding.
    kernels = pytest.importorskip("reorder_triton")
    monkeypatch.setattr(kernels, "CHUNK", 4)
    monkeypatch.setattr(kernels, "BLOCK_E", 4)
    launches, backward = [], kernels._backward

    class Spy:  # kernels._backward[grid](*args), noting the args
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(args) or backward[grid](*args, **kw)
    monkeypatch.setattr(kernels, "_backward", Spy())
    R, L, E, S = 3, 6, 7, 3  # 2 blocks of 4 channels, the second padded; S padded to 4
    inputs = scan_inputs(R, L, E, S, None)
    reorder.selective_scan(*inputs, backend="triton").sum().backward()
    (args,) = launches
    work = args[8]
    x, dt, A, B = (t.detach().float() for t in inputs[:4])
    dt, h, states = F.softplus(dt), torch.zeros(R, E, S), [torch.zeros(R, E, S)]
    for t in range(4):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None]
        states.append(h)
    want = F.pad(torch.stack(states, 1), (0, 1, 0, 1))  # [R, CHUNK + 1, 2 blocks x 4, 4]
    want = want.unflatten(2, (2, 4)).transpose(1, 2)  # [R, blocks, CHUNK + 1, BLOCK_E, 4]
    assert work.shape == want.shape
    assert (work - want).abs().max() <= 1e-5 * want.abs().max()


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


def test_triton_kernels_under_the_interpreter():
    # in the quick suite: small sizes, about 16 s of CPU time (on this file's 2-core machine)
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.abspath(__file__), "-k", "triton_scan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-3000:]
    last = out.stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last, out.stdout[-3000:]
