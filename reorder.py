"""REOrder, the vendorable core: patch orderings, a Plackett-Luce policy over them, and a small ViT
whose token mixer reads the reordered sequence (windowed attention, causal attention, a Mamba scan).

Paper: "REOrdering Patches Improves Vision Models" (Kutscher, Chan, Bai, Darrell, Gupta; arXiv
2505.23751, NeurIPS 2025). This file imports only torch and the standard library and keeps no global
state; copy it into your project as it is.

Conventions. An image of h x w patches has patch ids r * w + c (row-major, as x.flatten(2) gives).
An ordering is a permutation `perm` of length N = h * w: perm[k] is the id of the patch placed at
sequence slot k, so `tokens[:, perm]` reorders a [B, N, D] sequence and `argsort(perm)` gives each
patch's slot. The layout follows the paper: orderings (§3), the policy (§5), the model.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# §3 Orderings. Where the paper's text and its released code disagree we follow the code, whose
# orderings produced the published numbers (spiral ends in the centre; diagonals run along c - r).
# --------------------------------------------------------------------------------------------------

ORDERS = ("row", "column", "hilbert", "spiral", "diagonal", "snake")


def grid_size(img_size: Union[int, Tuple[int, int]], patch_size: int) -> Tuple[int, int]:
    """(h, w) patches of an image of `img_size` (int or (H, W)); a one-line ValueError if they
    do not tile it."""
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(n, int) and n > 0 for n in (*size, patch_size))):
        raise ValueError(f"image size {img_size!r} and patch size {patch_size!r} must be positive "
                         f"integers (an image size may be (H, W))")
    H, W = size
    if H < patch_size or W < patch_size or H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {patch_size}: "
                         f"choose an image size that is a multiple of the patch size")
    return H // patch_size, W // patch_size


def _hilbert_cells(h, w):
    """Cells (r, c) of a generalized Hilbert curve over any h x w grid (Červený's "gilbert" idea).

    A region is an origin plus a major vector `a` and a minor vector `b` (each axis-aligned). The
    curve enters at the origin and leaves at the far end of `a`, on the same side. A long, thin
    region is cut across `a` into two halves walked the same way; any other is cut into three: up
    `b` to half height, across the full `a`, and back down, so each piece again enters and leaves at
    its own ends. Halves are made even where possible, which keeps every step between grid
    neighbours; grids with one odd and one even side can need one diagonal step.
    """
    cells = []

    def sign(x):
        return (x > 0) - (x < 0)

    def walk(r, c, ar, ac, br, bc):
        len_a, len_b = abs(ar + ac), abs(br + bc)
        ua, ub = (sign(ar), sign(ac)), (sign(br), sign(bc))
        if len_b == 1 or len_a == 1:  # a single line of cells
            (dr, dc), n = (ua, len_a) if len_b == 1 else (ub, len_b)
            cells.extend((r + i * dr, c + i * dc) for i in range(n))
            return
        har, hac, hbr, hbc = ar // 2, ac // 2, br // 2, bc // 2
        if 2 * len_a > 3 * len_b:  # long region: two halves along a
            if abs(har + hac) % 2 and len_a > 2:
                har, hac = har + ua[0], hac + ua[1]
            walk(r, c, har, hac, br, bc)
            walk(r + har, c + hac, ar - har, ac - hac, br, bc)
        else:  # up b, across a, down b
            if abs(hbr + hbc) % 2 and len_b > 2:
                hbr, hbc = hbr + ub[0], hbc + ub[1]
            walk(r, c, hbr, hbc, har, hac)
            walk(r + hbr, c + hbc, ar, ac, br - hbr, bc - hbc)
            walk(r + (ar - ua[0]) + (hbr - ub[0]), c + (ac - ua[1]) + (hbc - ub[1]),
                 -hbr, -hbc, -(ar - har), -(ac - hac))

    if h >= w:
        walk(0, 0, h, 0, 0, w)  # major axis down the rows: top-left to bottom-left
    else:
        walk(0, 0, 0, w, h, 0)  # major axis along the columns: top-left to top-right
    return cells


def _spiral_ids(h, w):
    """Clockwise from the top-left corner, turning at the border or at a visited cell."""
    seen, ids = set(), []
    r, c, dr, dc = 0, 0, 0, 1
    for _ in range(h * w):
        ids.append(r * w + c)
        seen.add((r, c))
        if not (0 <= r + dr < h and 0 <= c + dc < w) or (r + dr, c + dc) in seen:
            dr, dc = dc, -dr  # turn clockwise
        r, c = r + dr, c + dc
    return ids


def order(name: str, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """The ordering `name` of an h x w patch grid (§3): LongTensor [h*w], perm[k] = patch at slot k.

    `name` is one of ORDERS or "random" (a fixed permutation drawn from `seed`). Exact 4 x 4
    sequences: row 0 1 2 3 ..., column 0 4 8 12 1 ..., hilbert 0 4 5 1 2 3 7 6 ..., spiral 0 1 2 3 7
    11 15 ..., diagonal 12 8 13 4 9 14 0 ..., snake 0 1 4 8 5 2 3 6 ...
    """
    if not (isinstance(h, int) and isinstance(w, int)):
        raise ValueError(f"grid sizes must be integers, got {h!r} x {w!r}")
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1 x 1 patches, got {h} x {w}")
    ids = torch.arange(h * w)
    r, c = ids // w, ids % w
    if name == "row":
        return ids
    if name == "column":
        return torch.argsort(c * h + r)
    if name == "hilbert":
        return torch.tensor([r_ * w + c_ for r_, c_ in _hilbert_cells(h, w)])
    if name == "spiral":
        return torch.tensor(_spiral_ids(h, w))
    if name == "diagonal":  # diagonals c - r from bottom-left to top-right, each walked downwards
        return torch.argsort((c - r + h - 1) * h + r)
    if name == "snake":  # JPEG zig-zag over anti-diagonals s = r + c: even s rightwards, odd back
        s = r + c
        return torch.argsort(s * w + torch.where(s % 2 == 0, c, w - 1 - c))
    if name == "random":
        return torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown order {name!r}: choose one of {', '.join(ORDERS + ('random',))}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C*p*p], patches in row-major id order (H, W divisible by p)."""
    B, C, H, W = images.shape
    h, w = grid_size((H, W), patch_size)
    p = patch_size
    return images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)


def check_perm(perm: torch.Tensor, n: int, batch: Optional[int] = None,
               values: bool = True) -> torch.Tensor:
    """`perm` if each of its rows is a permutation of 0..n-1, shape [..., n]; for a batch of
    `batch` images, [n] (one order for all) or [batch, n] (one per image). Else a one-line
    ValueError. For where orders enter (order files, from_order): the values' check costs a sort
    and, on a GPU, a wait for the host; values=False checks only dtype and shape (free)."""
    shape = f"[{n}] or [{batch}, {n}]" if batch is not None else f"[..., {n}]"
    if (perm.dtype != torch.long or perm.dim() < 1 or perm.shape[-1] != n
            or (batch is not None and perm.shape not in ((n,), (batch, n)))):
        raise ValueError(f"an order must be a LongTensor of shape {shape}, "
                         f"got {perm.dtype} {tuple(perm.shape)}")
    if values and not torch.equal(perm.sort(-1).values,
                                  torch.arange(n, device=perm.device).expand_as(perm)):
        raise ValueError(f"the order is not a permutation of 0..{n - 1}")
    return perm


def permute(tokens: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder tokens [B, N, D] by perm [N] (one order for the batch) or [B, N] (one per image)."""
    if perm.dim() == 1:
        return tokens[:, perm]
    return tokens.gather(1, perm.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# --------------------------------------------------------------------------------------------------
# §5 The policy: a Plackett-Luce distribution over permutations, one logit per patch, trained by
# REINFORCE. Two deliberate departures from the released code (bugs there): from_order() inverts the
# ramp so that argsort of the logits gives the order back, and samples are scored under the same
# logits / tau that drew them.
# --------------------------------------------------------------------------------------------------

class PlackettLuce(nn.Module):
    """p(σ) = Π_k exp(s_σk / τ) / Σ_{j≥k} exp(s_σj / τ) over permutations σ of N patches (§5)."""

    def __init__(self, num_patches: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_patches, dtype=torch.float32))

    @classmethod
    def from_order(cls, perm: torch.Tensor) -> "PlackettLuce":
        """Policy whose mode is `perm`: s[perm[k]] = -k / (N - 1), a ramp in slot order."""
        n = perm.numel()
        check_perm(perm, n)
        policy = cls(n)
        with torch.no_grad():
            policy.logits[perm] = -torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
        return policy

    def log_prob(self, perm: torch.Tensor, tau: float = 1.0, check: bool = True) -> torch.Tensor:
        """log p(perm) under logits / tau: perm [..., N] -> [...] (float32, any logits). check=False
        skips the permutation check's sort and host sync, for the policy's own samples."""
        if not tau > 0:  # at tau = 0 the scores would be NaN
            raise ValueError(f"tau must be > 0, got {tau} (sample() gives the mode at tau <= 0)")
        s = self.logits.float()[check_perm(perm, self.logits.numel(), values=check)] / tau
        # log Σ_{j≥k} exp(s_σj): a cumulative logsumexp over the sequence read backwards
        tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
        return (s - tail).sum(-1)

    def sample(self, batch_size: int, tau: float, generator: Optional[torch.Generator] = None):
        """(perm [B, N], log_prob [B]) by Gumbel-top-k: argsort(s / tau + g), g ~ Gumbel(0, 1).

        An exact Plackett-Luce sample with logits s / tau, scored under the same logits. tau <= 0
        gives the mode for every row and a zero log-prob (no sampling, no policy gradient).
        The noise is drawn on the generator's device, so a CPU generator gives the same orders
        whatever device the logits are on.
        """
        n = self.logits.numel()
        if tau <= 0:
            return self.mode().expand(batch_size, n).clone(), self.logits.new_zeros(batch_size)
        device = generator.device if generator is not None else self.logits.device
        u = torch.rand(batch_size, n, device=device, generator=generator).to(self.logits.device)
        tiny = torch.finfo(u.dtype).tiny
        gumbel = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))  # never log(0)
        perm = torch.argsort(self.logits.detach().float() / tau + gumbel, dim=-1, descending=True)
        return perm, self.log_prob(perm, tau, check=False)  # an argsort: a permutation

    def mode(self) -> torch.Tensor:
        """The most likely permutation: argsort of the logits, descending. [N]"""
        return torch.argsort(self.logits.detach(), descending=True, stable=True)


def reinforce_loss(log_prob: torch.Tensor, reward: torch.Tensor, baseline) -> torch.Tensor:
    """-mean((r - b) · log p(σ)) (§5): its gradient estimates -∇ E[r] without bias when b does not
    depend on σ. log_prob, reward and baseline of one shape ([K] orders, [K, B] orders of each
    image, ...), or a scalar baseline."""
    if reward.shape != log_prob.shape:  # broadcasting [K] against [K, 1] would be silently wrong
        raise ValueError(f"reward {list(reward.shape)} and log_prob {list(log_prob.shape)} must "
                         f"have one shape")
    advantage = (reward - baseline).detach()
    return -(advantage * log_prob).mean()


class EMABaseline:
    """Exponential moving average of the batch-mean reward (§5, momentum 0.99 as in the paper).

    Call it once per step with the step's mean reward (a float, or a 0-d tensor, which stays on
    its device: no wait for it): it returns the baseline for this step, built from earlier steps
    only (so it stays unbiased), then folds the new reward in. The first step's baseline is its
    own mean reward, so the first update has zero mean advantage instead of a jolt.
    """

    def __init__(self, momentum: float = 0.99):
        self.momentum, self.value = momentum, None

    def __call__(self, mean_reward):
        baseline = mean_reward if self.value is None else self.value
        self.value = self.momentum * baseline + (1 - self.momentum) * mean_reward
        return baseline

    def state_dict(self):
        return {"momentum": self.momentum, "value": None if self.value is None else
                float(self.value)}

    def load_state_dict(self, state):
        self.momentum, self.value = state["momentum"], state["value"]


def triangle_tau(step: int, steps: int, tau_max: float) -> float:
    """Temperature at `step` of a learning phase of `steps` steps: a triangle 0 -> tau_max -> 0, one
    value per step, never exactly 0 inside the phase (0 outside it). The released code steps it once
    per epoch, so tau barely leaves 0 there; the paper's curriculum means it per step."""
    if steps < 1:
        raise ValueError(f"a learning phase has at least one step, got steps={steps}")
    t = (step + 0.5) / steps
    return tau_max * max(0.0, 1 - abs(2 * t - 1)) if 0 < t < 1 else 0.0


def loo_baseline(reward: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Leave-one-out baseline b_i = mean_{j≠i} r_j along `dim` (Kool et al., 2019), same shape
    as reward: over the K orders scored on the same images (then a difference between images
    cancels exactly), or over the images of a batch, one order each."""
    k = reward.shape[dim]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples (orders or images)")
    return (reward.sum(dim, keepdim=True) - reward) / (k - 1)


# --------------------------------------------------------------------------------------------------
# Model: a small ViT whose token mixer reads the (reordered) patch sequence in one of three ways,
# the paper's three order-sensitive models. "window": attention within ±window slots plus a global
# CLS token (Longformer). "causal": each patch attends to itself and the patches before it, CLS is
# global (the paper's Transformer-XL as it trains: its segment memory is never used). "mamba": a
# selective state-space scan along the sequence (Mamba-1), read out at a CLS token placed last. The
# position embedding belongs to the patch, not the slot, so full attention is exactly
# order-invariant and every effect of the order comes from the mixer.
# --------------------------------------------------------------------------------------------------

MIXERS = ("window", "causal", "mamba", "bimamba")


def window_mask(n: int, window: Optional[int], causal: bool = False, device=None) -> torch.Tensor:
    """Boolean [1+n, 1+n], True = may attend. Token 0 (CLS) sees and is seen by all; token i sees
    tokens within ±window slots, or with `causal` only itself and the `window` before it (None:
    no limit)."""
    pos = torch.arange(1 + n, device=device)
    gap = pos[:, None] - pos[None, :]  # how many slots the key is before the query
    far = n if window is None else window
    mask = ((gap >= 0) if causal else (gap >= -far)) & (gap <= far)
    mask[0, :] = True
    mask[:, 0] = True
    return mask


def banded_attention(q, k, v, window: int, causal: bool = False, chunk: Optional[int] = None):
    """Attention under window_mask(n, window, causal) in O(N · window) time and memory.

    q, k, v: [B, H, 1+N, d], token 0 global. The N tokens are cut into m chunks of C >= window
    slots (default max(16, window)). Keys and values are laid out as one strip in which every chunk
    is preceded by a copy of CLS: [CLS, chunk 0, CLS, chunk 1, ...]. The keys a chunk's queries may
    need (CLS, then its chunk and `window` tokens either side) are then one contiguous stretch of
    that strip, so all m key blocks are overlapping strided views of it, never copies, and one call
    of the fused attention kernel scores each query against C + 2·window + 2 keys instead of N.
    Each stretch also holds the next chunk's CLS copy, which the mask hides (as it hides the keys
    after a query when `causal`). Returns [B, H, 1+N, d].
    """
    B, H, L, d = q.shape
    n = L - 1
    C = max(chunk or max(16, window), window)
    m = -(-n // C)
    pad = m * C - n
    K = C + 2 * window + 2  # strip slots around a chunk: window, CLS, C tokens, next CLS, window
    out_cls = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # CLS attends to everything

    def key_blocks(x):  # [B, H, 1+N, d] -> [B*H, m, K, d], views into the strip
        tokens = F.pad(x[:, :, 1:], (0, 0, 0, pad)).view(B, H, m, C, d)
        strip = torch.cat([x[:, :, :1, None].expand(B, H, m, 1, d), tokens], dim=3)
        strip = F.pad(strip.view(B, H, m * (C + 1), d), (0, 0, window, window + 1))
        return strip.unfold(2, K, C + 1).transpose(-1, -2).reshape(B * H, m, K, d)

    # Key u of chunk j sits r = u - window strip slots after the chunk's CLS copy: r = 0 is that
    # CLS, r = C + 1 the next chunk's, any other r a token, at sequence slot j*C + r minus the CLS
    # copies passed. Query i of chunk j is at slot j*C + i.
    i = torch.arange(C, device=q.device)[:, None]
    u = torch.arange(K, device=q.device)
    j = torch.arange(m, device=q.device)[:, None, None]
    r = u - window
    slot = j * C + r - (r > 0).long() - (r > C + 1).long()
    is_token = (r != 0) & (r != C + 1)
    gap = j * C + i - slot  # how many slots the key is before the query
    near = ((gap >= 0) if causal else (gap >= -window)) & (gap <= window)
    allowed = (r == 0) | (is_token & near & (slot >= 0) & (slot < n))
    q_tok = F.pad(q[:, :, 1:], (0, 0, 0, pad)).reshape(B * H, m, C, d)
    out = F.scaled_dot_product_attention(q_tok, key_blocks(k), key_blocks(v),
                                         attn_mask=allowed[None])  # 4-D: the fused CPU kernel's
    return torch.cat([out_cls, out.reshape(B, H, m * C, d)[:, :, :n]], dim=2)


def window_attention(q, k, v, window: Optional[int], causal: bool = False):
    """Attention over [CLS] + N tokens under window_mask(N, window, causal): q, k, v
    [B, H, 1+N, d] -> [B, H, 1+N, d].

    window=None is full (or fully causal) attention. Short sequences use dense masked attention
    (as fast there); long ones the banded form, whose cost grows as N · window. Fully causal
    attention uses the kernel's own causal mask (with CLS first, it is exactly what the patches
    need) and attends CLS to everything apart.
    """
    n = q.shape[-2] - 1
    if window is None or window >= n - 1:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.cat([F.scaled_dot_product_attention(q[:, :, :1], k, v), out[:, :, 1:]], 2)
    if n <= 256 or 4 * window >= n:  # where dense is as fast on CPU (tests/bench.py)
        mask = window_mask(n, window, causal, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return banded_attention(q, k, v, window, causal)


SCAN_BLOCK = 2 ** 18  # state entries in a block of the torch path (1 MB in float32): its few
# [rows, slots, channels, S] tensors stay in cache (2 MB of L2 a core here), not in memory; as
# fast as 2^17 on one thread, faster on two (each thread's half in its own L2; docs/results.md)


def _blocks(R, E, S, T):
    """The torch path's blocks: (rows, channels) slices that tile R rows x E channels, cut evenly,
    a block of T slots about SCAN_BLOCK state entries: at most that where the cuts are exact
    (powers of two), a little more where an even cut rounds up; one channel of one row at least."""
    eb = -(-E // -(-T * E * S // SCAN_BLOCK))  # E cut evenly into ceil(T E S / SCAN_BLOCK) parts
    rows = max(1, SCAN_BLOCK // (T * eb * S))  # the most rows of eb channels a block holds
    rb = -(-R // -(-R // rows))  # R cut evenly into ceil(R / rows) parts
    return [(slice(r, r + rb), slice(e, e + eb)) for r in range(0, R, rb) for e in range(0, E, eb)]


def _scan_chunk(h0, xd, dt, A, B):
    """The states of a chunk of T slots from the state h0 before it: h0 [r, E, S]; Δ x and Δ
    [r, T, E]; A [r, 1, E, S]; B [r, T, S] -> a = exp(Δ A), h [r, T, E, S] (r rows, E channels:
    a block's)."""
    a = torch.exp(dt[..., None] * A)
    h = xd[..., None] * B[..., None, :]  # b_t = Δ_t B_t x_t, then h_t = b_t + a_t h_{t-1}
    hs, as_ = h.unbind(1), a.unbind(1)  # views, one per slot; in place: no graph per step
    hs[0].addcmul_(as_[0], h0)
    for t in range(1, len(hs)):
        hs[t].addcmul_(as_[t], hs[t - 1])
    return a, h


def _prepare(x, dt, A, B, C):
    """The blocks' inputs in float32, contiguous: x, Δ = softplus(dt), Δ x [R, L, E]; B, C [R, L,
    S]; A per row (its core's) [R, 1, E, S]."""
    x, dt = x.float().contiguous(), F.softplus(dt.float().contiguous())
    return x, dt, dt * x, A.float().repeat_interleave(len(x) // len(A), 0)[:, None], \
        B.float().contiguous(), C.float().contiguous()


class _SelectiveScan(torch.autograd.Function):
    """selective_scan's torch path on rows [R, L, .], in blocks of rows and channels (_blocks) that
    fit in cache, each walked chunk by chunk: forward keeping the state before each chunk;
    backward, chunk by chunk from the last, recomputing the chunk's states from that start. Σ_s
    is a product with a vector of ones (on CPU faster than sum(-1) over 16 entries). With c_loop
    (_c_loop's reorder_cpu), one C loop walks the same chunks instead. Autograd casts each gradient
    to its input's dtype."""

    @staticmethod
    def forward(ctx, x_in, dt_in, A_in, B_in, C_in, D, chunk, c_loop):
        (n, E, S), (R, L) = A_in.shape, x_in.shape[:2]
        x, dt, xd, A, B, C = _prepare(x_in, dt_in, A_in, B_in, C_in)
        y, ones = torch.empty_like(x), x.new_ones(S)
        starts = x.new_empty((R, -(-L // chunk), E, S))
        if c_loop:  # one C loop over all rows, channels and slots
            c_loop.scan_forward(dt, xd, A[:, 0], B, C, y, starts, chunk)
        for rs, es in [] if c_loop else _blocks(R, E, S, min(chunk, L)):
            h = x.new_zeros(starts[rs, 0, es].shape)
            for c in range(starts.shape[1]):
                ts = slice(c * chunk, (c + 1) * chunk)
                starts[rs, c, es] = h
                h = _scan_chunk(h, xd[rs, ts, es], dt[rs, ts, es], A[rs, :, es], B[rs, ts])[1]
                y[rs, ts, es] = (h * C[rs, ts, None]) @ ones  # C_t · h_t
                h = h[:, -1]
        y.view(n, -1, L, E).addcmul_(D.float()[:, None, None], x.view(n, -1, L, E))  # + D x_t
        ctx.save_for_backward(x_in, dt_in, A_in, B_in, C_in, D, starts)
        ctx.chunk, ctx.c_loop = chunk, c_loop
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_in, dt_in, A_in, B_in, C_in, D, starts = ctx.saved_tensors
        (n, E, S), (R, L), T = A_in.shape, x_in.shape[:2], ctx.chunk
        x, dt, xd, A, B, C = _prepare(x_in, dt_in, A_in, B_in, C_in)
        gy, ones = grad_y.float().contiguous(), x.new_ones(S)  # (y.sum()'s gradient: a view)
        dx, ddt, dA = torch.empty_like(x), torch.empty_like(x), torch.zeros_like(A[:, 0])
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)  # sums over channel blocks
        if ctx.c_loop:
            ctx.c_loop.scan_backward(x, dt, xd, A[:, 0], B, C, gy, starts, dx, ddt, dA, dB, dC, T)
        for rs, es in [] if ctx.c_loop else _blocks(R, E, S, min(T, L)):
            g_next = 0  # a_{t+1} ⊙ g_{t+1} from the chunk after this one
            for c in reversed(range(starts.shape[1])):
                ts = slice(c * T, (c + 1) * T)
                h0, A_b, B_b, dt_b, xd_b = starts[rs, c, es], A[rs, :, es], B[rs, ts], \
                    dt[rs, ts, es], xd[rs, ts, es]
                a, h = _scan_chunk(h0, xd_b, dt_b, A_b, B_b)  # [r, T, e, S]
                r, e = h.shape[0], h.shape[2]
                g = gy[rs, ts, es, None] * C[rs, ts, None]  # then g_t = C_t gy_t + a_{t+1} g_{t+1}
                gs, as_ = g.unbind(1), a.unbind(1)
                gs[-1].add_(g_next)
                for t in range(len(gs) - 2, -1, -1):
                    gs[t].addcmul_(as_[t + 1], gs[t + 1])
                g_next = as_[0] * gs[0]
                gy_b = gy[rs, ts, es].reshape(-1, 1, e)  # Σ_e: batched [1, e] x [e, S] products
                dC[rs, ts] += torch.bmm(gy_b, h.view(-1, e, S)).view(r, -1, S)  # Σ_e gy h
                dB[rs, ts] += torch.bmm(xd_b.reshape(-1, 1, e), g.view(-1, e, S)).view(r, -1, S)
                G = (g * B_b[..., None, :]) @ ones  # Σ_s g B  [r, T, e]
                q = a.mul_(g)  # then q_t = g_t a_t h_{t-1}
                q[:, 1:] *= h[:, :-1]
                q[:, 0] *= h0
                dx[rs, ts, es] = dt_b * G
                ddt[rs, ts, es] = (q * A_b) @ ones + x[rs, ts, es] * G
                dA[rs, es] += (q * dt_b[..., None]).sum(1)
        Dc, x, gy = D.float()[:, None, None], x.view(n, -1, L, E), gy.view(n, -1, L, E)
        dx.view(n, -1, L, E).addcmul_(Dc, gy)
        ddt *= torch.sigmoid(dt_in.float())  # dΔ/ddt
        return (dx, ddt, dA.view(n, -1, E, S).sum(1), dB, dC, (gy * x).sum((1, 2)), None, None)


def _check_scan(x, dt, A, B, C, D):
    """A one-line ValueError naming the first of selective_scan's inputs its docstring does not
    allow: not a float tensor, not on x's device, a shape x and A disagree with, cores not
    dividing R. Both backends run after it: the kernels would read out of bounds."""
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D)
    for name, t in named.items():
        if getattr(t, "dtype", None) not in (torch.float32, torch.bfloat16, torch.float16,
                                             torch.float64):
            raise ValueError(f"selective_scan: {name} is {getattr(t, 'dtype', type(t).__name__)}"
                             ", expected a float32, bfloat16, float16 or float64 tensor")
        if t.device != x.device:
            raise ValueError(f"selective_scan: {name} is on {t.device}, x on {x.device}")
    if x.dim() != 3 or A.dim() not in (2, 3):
        name, dims = ("x", "[R, L, E]") if x.dim() != 3 else ("A", "[E, S] or [n, E, S]")
        raise ValueError(f"selective_scan: {name} has shape {list(named[name].shape)}, "
                         f"expected {dims}")
    (R, L, E), S, n = x.shape, A.shape[-1], A.shape[:-2]  # n: () for one core, else (cores,)
    cores = "n, " * len(n)
    for name, dims, shape in (("dt", "R, L, E", (R, L, E)), ("A", cores + "E, S", (*n, E, S)),
                              ("B", "R, L, S", (R, L, S)), ("C", "R, L, S", (R, L, S)),
                              ("D", cores + "E", (*n, E))):
        if named[name].shape != shape:
            raise ValueError(f"selective_scan: {name} has shape {list(named[name].shape)}, "
                             f"expected [{dims}] = {list(shape)}")
    if n and (n[0] == 0 or R % n[0]):
        raise ValueError(f"selective_scan: A has shape {list(A.shape)}, expected n >= 1 cores "
                         f"that divide x's {R} rows")


@torch.compiler.disable  # torch.compile runs the kernels as they are: a graph break around them
def _triton_scan(x, dt, A, B, C, D):
    """reorder_triton's fused kernels, or None where they cannot run: tensors not on CUDA
    (TRITON_INTERPRET=1 runs them on CPU ones), no triton, or reorder.py copied alone."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        import reorder_triton
    except ImportError:
        return None
    return reorder_triton.selective_scan(x, dt, A, B, C, D)


def _c_loop(x):
    """reorder_cpu, the scan as one compiled C loop, or None where it cannot run: tensors not on
    the CPU, torch.compile tracing (it cannot read the loop), no C compiler, or reorder.py copied
    alone."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    try:
        import reorder_cpu
    except ImportError:
        return None
    return reorder_cpu if reorder_cpu.lib() else None


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor, backend: str = "auto",
                   chunk: Optional[int] = None) -> torch.Tensor:
    """Mamba-1's selective scan over R rows of L slots, E channels and S states each:
    Δ_t = softplus(dt_t), h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t from h_{-1} = 0, and
    y_t = C_t · h_t + D x_t (h_t [E, S]: per channel e, a state vector over s).

    x, dt [R, L, E] (dt before its softplus); B, C [R, L, S]; A [E, S], D [E], or for n scan
    cores A [n, E, S], D [n, E], core k reading rows k R / n to (k + 1) R / n - 1. Returns y
    [R, L, E] in float32, the math's dtype whatever the inputs' (float32, bfloat16, float16).
    The states [R, L, E, S] are never kept. The torch path walks the slots in chunks (`chunk`
    slots; by default 16, or more where all rows' chunk fits SCAN_BLOCK entries), keeps the
    state before each chunk ([R, L / chunk, E, S]: at most the size of x) and its backward pass
    recomputes a chunk's states from there. The gradients, with gy = dL/dy, a_t = exp(Δ_t A),
    g_t = dL/dh_t = C_t gy_t + a_{t+1} ⊙ g_{t+1} (the recurrence run backwards),
    q_t = g_t ⊙ a_t ⊙ h_{t-1} and G_t = Σ_s g_t B_t, summing over a core's rows:
        dx_t = Δ_t G_t + D gy_t      dΔ_t = Σ_s q_t A + x_t G_t, ddt_t = dΔ_t sigmoid(dt_t)
        dA = Σ_rows,t Δ_t q_t        dB_t = Σ_e g_t Δ_t x_t
        dC_t = Σ_e gy_t h_t          dD = Σ_rows,t gy_t x_t
    backend: "torch"; "triton", the fused kernels of reorder_triton.py (beside this file); "c",
    the same chunks in one C loop (reorder_cpu.py, compiled at first use: 3-4x faster on CPU);
    "auto", triton for CUDA tensors where it imports, c for CPU ones where it compiles, else
    torch. All refuse other shapes, dtypes or devices with the same one-line ValueError; with R,
    L, E or S = 0, y = D x (no state, no sum).
    """
    if backend not in ("auto", "torch", "triton", "c"):
        raise ValueError(f"unknown backend {backend!r}: choose auto, torch, triton or c")
    _check_scan(x, dt, A, B, C, D)
    if A.dim() == 2:  # one core
        A, D = A[None], D[None]
    if x.numel() == 0 or A.numel() == 0:  # no rows, slots or channels, or no state: y = D x
        zero = sum(t.flatten()[:0].sum() for t in (dt, A, B, C))  # 0, and 0 gradients for them
        return D.float().repeat_interleave(len(x) // len(A), 0)[:, None] * x.float() + zero
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton" or (backend == "auto" and x.is_cuda):
            y = _triton_scan(x, dt, A, B, C, D)
            if y is not None:
                return y
            if backend == "triton":
                raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), "
                                 "triton and reorder_triton.py beside reorder.py")
        c_loop = None if backend == "torch" else _c_loop(x)
        if backend == "c" and c_loop is None:
            raise ValueError("backend 'c' needs CPU tensors, outside torch.compile, a C compiler "
                             "with OpenMP and reorder_cpu.py beside reorder.py")
        return _SelectiveScan.apply(x, dt, A, B, C, D, chunk or max(
            16, SCAN_BLOCK // x.shape[0] // A[0].numel()), c_loop)


class Mamba(nn.Module):
    """Mamba-1's selective state-space layer (Gu and Dao, 2023): [B, L, D] -> same. Plain torch,
    but for selective_scan's fused kernels on CUDA (reorder_triton.py, where it imports).

    in_proj to x and a gate z (expand x width each); then per scan core: a causal depthwise conv
    (kernel d_conv) and SiLU on x, x projected to (Δ, B, C) with Δ = softplus(dt_proj(·)) per
    channel, the scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t · h_t + D x_t
    (A = -exp(A_log) per channel and state; selective_scan, float32 under autocast too); the
    cores' mean y, y · SiLU(z), out_proj.
    directions=1 ("mamba"): one core reading the sequence first to last slot. directions=4
    ("bimamba", the paper's released "bimamba v3" layer): cores read the sequence forward, flipped,
    "transposed" (the first h*w tokens, in slot order, laid row by row on the h x w `grid`, the grid
    transposed and read row by row) and that flipped; each core has its own conv, x_proj, dt_proj,
    A_log and D (stacked on dim 0, so the cores run as one scan), in_proj and out_proj are shared.
    Departure: tokens after the first h*w (the model's CLS, placed last) are held out of the
    transposition and stay last; the released code holds out the token at index L // 2, puts CLS
    first and reads out the last patch.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 directions: int = 1, grid: Optional[Tuple[int, int]] = None):
        super().__init__()
        if directions not in (1, 4) or (directions == 4 and grid is None):
            raise ValueError("Mamba takes directions=1, or directions=4 with a grid (h, w)")
        n, E, self.grid = directions, expand * dim, grid
        self.dt_rank, self.d_state = math.ceil(dim / 16), d_state
        self.in_proj = nn.Linear(dim, 2 * E)
        self.conv = nn.Conv1d(n * E, n * E, d_conv, groups=n * E, padding=d_conv - 1)
        self.x_proj = nn.Parameter(torch.empty(n, E, self.dt_rank + 2 * d_state))  # no bias
        self.dt_proj = nn.Parameter(torch.empty(n, self.dt_rank, E))
        self.dt_bias = nn.Parameter(torch.empty(n, E))
        self.A_log = nn.Parameter(torch.empty(n, E, d_state))
        self.D = nn.Parameter(torch.empty(n, E))
        self.out_proj = nn.Linear(E, dim)
        self.reset_parameters()

    def reset_parameters(self, layers: int = 1):
        """mamba_ssm's initialization: Linear weights PyTorch's default (±1/sqrt(fan in)), biases
        zero but Δ's, out_proj's weight / sqrt(layers) (its rescale_prenorm_residual; ViT passes
        2 x depth, a mixer and an MLP per block); A = -(1, 2, ..., d_state), D = 1, Δ = softplus(
        dt_bias) log-uniform in [0.001, 0.1] in every core. Departure: the released code gives only
        the forward core that Δ; its other three start near softplus(0) ≈ 0.7, an accident."""
        with torch.no_grad():
            for linear in (self.in_proj, self.out_proj):
                linear.reset_parameters()
                linear.bias.zero_()
            self.out_proj.weight /= math.sqrt(layers)
            self.x_proj.uniform_(-self.x_proj.shape[1] ** -0.5, self.x_proj.shape[1] ** -0.5)
            self.dt_proj.uniform_(-self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
            self.A_log.copy_(torch.arange(1, self.d_state + 1).log().expand_as(self.A_log))
            self.D.fill_(1.0)

    def _transpose(self, x, h, w):  # [B, L, E], first h*w tokens laid on h x w, read by columns
        n = h * w
        return torch.cat([x[:, :n].unflatten(1, (h, w)).transpose(1, 2).flatten(1, 2), x[:, n:]], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, L, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, E] each
        if len(self.D) == 4:  # what each core reads: forward, flipped, transposed, flipped again
            t = self._transpose(x, *self.grid)
            x = torch.stack([x, x.flip(1), t, t.flip(1)])  # [n, B, L, E]
        else:
            x = x[None]
        n, E = x.shape[0], x.shape[-1]
        x = self.conv(x.permute(1, 0, 3, 2).reshape(Bsz, n * E, L))[..., :L]  # slot t sees t-3..t
        # [n, B, L, E] in that layout, so that the scan's rows below are views (no copies kept)
        x = F.silu(x.view(Bsz, n, E, L).permute(1, 0, 3, 2).contiguous())
        # [n, B L, .]: a batched matmul per core, no copy of the weights per image
        split = [self.dt_rank, self.d_state, self.d_state]
        dt, B, C = (x.flatten(1, 2) @ self.x_proj).split(split, -1)
        dt = dt @ self.dt_proj + self.dt_bias[:, None]  # [n, B L, E], Δ before its softplus
        A = -torch.exp(self.A_log.float())  # [n, E, S]
        x, dt, B, C = (t.reshape(n * Bsz, L, -1) for t in (x, dt, B, C))  # the cores' rows: views
        y = selective_scan(x, dt, A, B, C, self.D).view(n, Bsz, L, E)  # float32
        if n == 4:  # each core's outputs back at their tokens, then the mean
            t = self._transpose(y[2] + y[3].flip(1), *self.grid[::-1])  # the w x h grid back
            y = (y[0] + y[1].flip(1) + t) / 4
        else:
            y = y[0]
        return self.out_proj(y.to(z.dtype) * F.silu(z))


@dataclass
class ViTConfig:
    img_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    mixer: str = "window"  # one of MIXERS
    window: Optional[int] = 7  # window: ±slots; causal: earlier slots; None = all; mamba: unused


PRESETS = {
    "tiny": dict(dim=192, depth=12, heads=3),
    "small": dict(dim=384, depth=12, heads=6),
    "base": dict(dim=768, depth=12, heads=12),  # the paper's size
}


def vit_config(preset: str, **overrides) -> ViTConfig:
    """ViTConfig of a named preset (tiny, small, base) with fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}: choose one of {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[preset], **overrides})


class Attention(nn.Module):
    def __init__(self, dim, heads, window, causal):
        super().__init__()
        self.heads, self.window, self.causal = heads, window, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = window_attention(q, k, v, self.window, self.causal)  # [B, heads, L, D / heads]
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm: x + mix(LN x), then x + MLP(LN x); only the mixer differs between models."""

    def __init__(self, cfg: ViTConfig, grid: Tuple[int, int]):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.mix = (Mamba(cfg.dim, directions=4 if cfg.mixer == "bimamba" else 1, grid=grid)
                    if "mamba" in cfg.mixer
                    else Attention(cfg.dim, cfg.heads, cfg.window, cfg.mixer == "causal"))
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, cfg.dim))

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT over a reordered patch sequence with a CLS token: first and global for the
    attention mixers, last for mamba (the scan's final state has read every patch)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {cfg.mixer!r}: choose one of {', '.join(MIXERS)}")
        if cfg.window is not None and cfg.window < 0:
            raise ValueError(f"window must be >= 0 or None (no limit), got {cfg.window}")
        scan = "mamba" in cfg.mixer  # a scan has no heads
        sizes = {"width": cfg.dim, "depth": cfg.depth, **({} if scan else {"heads": cfg.heads})}
        if not all(isinstance(n, int) and n > 0 for n in sizes.values()):
            raise ValueError(f"{', '.join(sizes)} must be positive integers, got {sizes}")
        if not scan and cfg.dim % cfg.heads:
            raise ValueError(f"width {cfg.dim} is not divisible by {cfg.heads} heads")
        self.cfg, self.cls_last = cfg, scan
        self.grid = grid_size(cfg.img_size, cfg.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        patch_dim = cfg.in_chans * cfg.patch_size ** 2
        self.patch_embed = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, cfg.dim),
                                         nn.LayerNorm(cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, cfg.dim))  # one per patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, self.grid) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(self._init)
        for m in self.modules():
            if isinstance(m, Mamba):
                m.reset_parameters(2 * cfg.depth)  # mamba_ssm's init, not the ViT's std 0.02
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits [B, classes] of images [B, C, H, W], patches read in order perm [N] or
        [B, N] (None: row-major). Only perm's shape is checked here (no sort, no host sync, no
        graph break): validate orders where they enter, with check_perm."""
        p, (h, w) = self.cfg.patch_size, self.grid
        if images.dim() != 4 or images.shape[1:] != (self.cfg.in_chans, h * p, w * p):
            raise ValueError(f"model expects images of {self.cfg.in_chans}x{h * p}x{w * p} (a "
                             f"batch [B, C, H, W]), got shape {list(images.shape)}")
        x = self.patch_embed(patchify(images, p)) + self.pos_embed  # [B, N, D]
        if perm is not None:
            x = permute(x, check_perm(perm, self.num_patches, len(images), values=False))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x, cls] if self.cls_last else [cls, x], dim=1)  # [B, 1+N, D]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -1] if self.cls_last else x[:, 0]))
