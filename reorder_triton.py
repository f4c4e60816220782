"""Fused Triton kernels for reorder.selective_scan: one launch for the forward pass, one for the
backward pass, instead of a few torch ops per slot. Optional: reorder.py imports this file lazily
(backend "auto" on CUDA, or "triton") and runs its torch path where this file or triton is missing.

The math is reorder.selective_scan's (its docstring has the recurrence and the gradients), written
per program: program (r, block) owns row r and a block of BLOCK_E channels, and keeps their state
h [BLOCK_E, S] in registers while it walks the L slots, so the states [R, L, E, S] never reach
memory. Like the torch path, the forward pass stores the state before every chunk of CHUNK slots
(`starts`, [R, L / CHUNK, E, S]); the backward pass walks the chunks last to first, recomputes a
chunk's states from its start into this program's scratch rows, then runs the gradient recurrence
g_t = C_t gy_t + a_{t+1} g_{t+1} backwards through it. Sums over rows (dA, dD) and over channels
(dB, dC) are written per program and added up in torch afterwards: deterministic, no atomics.
TRITON_INTERPRET=1, set before triton is first imported, runs the kernels on CPU tensors.
"""
import torch
import triton
import triton.language as tl

CHUNK = 16  # slots per stored state (they cost S / CHUNK of x); the scratch: CHUNK + 1 states
BLOCK_E = 32  # channels per program


@triton.jit
def _softplus(x):  # log(1 + e^x), to float32 precision for small e^x too (Goldberg's log1p)
    u = tl.exp(tl.where(x > 20.0, 20.0, x))  # as F.softplus: x beyond 20; NaN stays NaN
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _load_slot(x_ptr, dt_ptr, B_ptr, row_t, E, S, e, s, e_ok, s_ok):
    """Slot t of row r (row_t = r L + t): x, dt (before softplus) [BLOCK_E] and B [BLOCK_S]."""
    x = tl.load(x_ptr + row_t * E + e, mask=e_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row_t * E + e, mask=e_ok, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + row_t * S + s, mask=s_ok, other=0.0).to(tl.float32)
    return x, dt, B


@triton.jit
def _step(h, x, dt, A, B, es_ok):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t; 0 in the lanes past E and S, even beside an inf
    (0 inf = NaN there would reach the sums over channels and states)."""
    return tl.where(es_ok, tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B[None, :], 0.0)


@triton.jit
def _forward(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, starts_ptr, L, E, S, rows_per_core,
             BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    r, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    core = r // rows_per_core
    e, s = block * BLOCK_E + tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_S)
    e_ok, s_ok = e < E, s < S
    es, es_ok = e[:, None] * S + s[None, :], e_ok[:, None] & s_ok[None, :]  # [BLOCK_E, BLOCK_S]
    A = tl.load(A_ptr + core * E * S + es, mask=es_ok, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + core * E + e, mask=e_ok, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_E, BLOCK_S], dtype=tl.float32)
    chunks = tl.cdiv(L, CHUNK)
    for c in range(0, chunks):
        tl.store(starts_ptr + (r * chunks + c) * E * S + es, h, mask=es_ok)
        for t in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, L)):
            x, dt, B = _load_slot(x_ptr, dt_ptr, B_ptr, r * L + t, E, S, e, s, e_ok, s_ok)
            C = tl.load(C_ptr + (r * L + t) * S + s, mask=s_ok, other=0.0).to(tl.float32)
            h = _step(h, x, _softplus(dt), A, B, es_ok)
            y = tl.sum(h * C[None, :], axis=1) + D * x
            tl.store(y_ptr + (r * L + t) * E + e, y, mask=e_ok)


@triton.jit
def _backward(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, starts_ptr, gy_ptr, work_ptr,
              dx_ptr, ddt_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, R, L, E, S, rows_per_core,
              BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    r, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    core = r // rows_per_core
    e, s = block * BLOCK_E + tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_S)
    e_ok, s_ok = e < E, s < S
    es, es_ok = e[:, None] * S + s[None, :], e_ok[:, None] & s_ok[None, :]
    A = tl.load(A_ptr + core * E * S + es, mask=es_ok, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + core * E + e, mask=e_ok, other=0.0).to(tl.float32)
    # this program's scratch: CHUNK + 1 states [BLOCK_E, BLOCK_S], h_{t0-1} .. h_{t0+CHUNK-1}
    work = work_ptr + (r * tl.num_programs(1) + block) * (CHUNK + 1) * BLOCK_E * BLOCK_S
    local = tl.arange(0, BLOCK_E)[:, None] * BLOCK_S + s[None, :]
    partial = (block * R + r) * L  # this program's rows of the dB, dC partial sums
    g_next = tl.zeros([BLOCK_E, BLOCK_S], dtype=tl.float32)  # a_{t+1} g_{t+1}
    dA = tl.zeros([BLOCK_E, BLOCK_S], dtype=tl.float32)
    dD = tl.zeros([BLOCK_E], dtype=tl.float32)
    chunks = tl.cdiv(L, CHUNK)
    for i in range(0, chunks):
        c = chunks - 1 - i
        t0 = c * CHUNK
        slots = tl.minimum(CHUNK, L - t0)
        h = tl.load(starts_ptr + (r * chunks + c) * E * S + es, mask=es_ok, other=0.0)
        tl.store(work + local, h)
        for j in range(0, slots):  # the chunk's states again, from its start
            x, dt, B = _load_slot(x_ptr, dt_ptr, B_ptr, r * L + t0 + j, E, S, e, s, e_ok, s_ok)
            h = _step(h, x, _softplus(dt), A, B, es_ok)
            tl.store(work + (j + 1) * BLOCK_E * BLOCK_S + local, h)
        tl.debug_barrier()
        for j in range(0, slots):  # then backwards through them
            k = slots - 1 - j
            t = t0 + k
            x, dt_raw, B = _load_slot(x_ptr, dt_ptr, B_ptr, r * L + t, E, S, e, s, e_ok, s_ok)
            C = tl.load(C_ptr + (r * L + t) * S + s, mask=s_ok, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + (r * L + t) * E + e, mask=e_ok, other=0.0).to(tl.float32)
            dt = _softplus(dt_raw)
            a = tl.where(es_ok, tl.exp(dt[:, None] * A), 0.0)  # not exp(inf 0) in the padding
            h = tl.load(work + (k + 1) * BLOCK_E * BLOCK_S + local)
            h_prev = tl.load(work + k * BLOCK_E * BLOCK_S + local)
            g = tl.where(es_ok, g_next + gy[:, None] * C[None, :], 0.0)  # dL/dh_t, as h
            q = g * a * h_prev  # dL/d(Δ_t A)
            gB = tl.sum(g * B[None, :], axis=1)
            tl.store(dx_ptr + (r * L + t) * E + e, dt * gB + D * gy, mask=e_ok)
            ddt = (tl.sum(q * A, axis=1) + x * gB) * tl.sigmoid(dt_raw)
            tl.store(ddt_ptr + (r * L + t) * E + e, ddt, mask=e_ok)
            tl.store(dB_ptr + (partial + t) * S + s, tl.sum(g * (dt * x)[:, None], axis=0),
                     mask=s_ok)
            tl.store(dC_ptr + (partial + t) * S + s, tl.sum(gy[:, None] * h, axis=0), mask=s_ok)
            dA += q * dt[:, None]
            dD += gy * x
            g_next = a * g
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dA_ptr + r * E * S + es, dA, mask=es_ok)
    tl.store(dD_ptr + r * E + e, dD, mask=e_ok)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D):
        x, dt, A, B, C, D = (t.contiguous() for t in (x, dt, A, B, C, D))
        (R, L, E), (n, _, S) = x.shape, A.shape
        y = x.new_empty((R, L, E), dtype=torch.float32)
        starts = x.new_empty((R, triton.cdiv(L, CHUNK), E, S), dtype=torch.float32)
        _forward[(R, triton.cdiv(E, BLOCK_E))](
            x, dt, A, B, C, D, y, starts, L, E, S, R // n, BLOCK_E=BLOCK_E,
            BLOCK_S=triton.next_power_of_2(S), CHUNK=CHUNK)
        ctx.save_for_backward(x, dt, A, B, C, D, starts)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, dt, A, B, C, D, starts = ctx.saved_tensors
        (R, L, E), (n, _, S) = x.shape, A.shape
        blocks, block_s = triton.cdiv(E, BLOCK_E), triton.next_power_of_2(S)
        f32 = dict(device=x.device, dtype=torch.float32)
        dx, ddt = torch.empty(R, L, E, **f32), torch.empty(R, L, E, **f32)
        dA, dD = torch.empty(R, E, S, **f32), torch.empty(R, E, **f32)  # per row
        dB, dC = torch.empty(blocks, R, L, S, **f32), torch.empty(blocks, R, L, S, **f32)
        work = torch.empty(R, blocks, CHUNK + 1, BLOCK_E, block_s, **f32)
        _backward[(R, blocks)](
            x, dt, A, B, C, D, starts, gy.contiguous(), work, dx, ddt, dA, dD, dB, dC, R, L, E,
            S, R // n, BLOCK_E=BLOCK_E, BLOCK_S=block_s, CHUNK=CHUNK)
        # autograd casts each gradient to its input's dtype
        return dx, ddt, dA.view(n, -1, E, S).sum(1), dB.sum(0), dC.sum(0), dD.view(n, -1, E).sum(1)


def selective_scan(x, dt, A, B, C, D):
    """reorder.selective_scan's fused kernels: x, dt [R, L, E] (dt before softplus), A [n, E, S],
    B, C [R, L, S], D [n, E] -> y [R, L, E] float32, R, L, E, S >= 1 (reorder.selective_scan
    checks all this first). Inputs may be float32, bfloat16, float16 or float64."""
    return _SelectiveScan.apply(x, dt, A, B, C, D)
