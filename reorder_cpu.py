"""reorder.selective_scan on CPU tensors as one C loop per pass (optional, beside reorder.py).

The math is selective_scan's (its docstring has the recurrence and the gradients). Each (row r,
channel e) keeps its state h [S] in registers while it walks the L slots, instead of the torch
path's few ops per slot on [rows, channels, S] slices, each about as short as torch's per-op
overhead (docs/results.md, issue 33). As there, the forward pass stores the state before every
chunk of T slots (starts [R, L / T, E, S]), and the backward pass walks the chunks last to first,
recomputes a chunk's states from its start into a scratch of T + 1 states, then runs
g_t = C_t gy_t + a_{t+1} g_{t+1} backwards through it. Rows are split between torch's threads.

The source below is compiled by the system's C compiler ($CC, else cc) at the first call of a
process, in a private temporary folder removed once loaded, and called through ctypes: nothing
to install, nothing left on disk. Where compiling fails, lib() warns once and gives None, and
reorder.py runs its torch path. -ffast-math lets gcc call glibc's vector exp; NaN and inf are
still carried as the torch path carries them (tests/test_scan.py).
"""
import ctypes
import functools
import os
import subprocess
import tempfile
import warnings

import torch

# Float32, contiguous: x, dt (= Δ, after its softplus), xd (= Δ x), gy [R, L, E]; A [R, E, S] (each
# row its core's); B, C [R, L, S].
SOURCE = r"""#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#pragma GCC target("prefer-vector-width=512")  /* 16 lanes where -march=native has AVX-512 */
#endif

#define AT(r, t, width) (((long)(r) * L + (t)) * (width))  /* slot t of row r, [R, L, width] */

/* y = C · h (without D x); starts as above. Chunk by chunk, then channel by channel: a chunk's B
   and C stay in L1 while all channels read them (a row's whole B and C did not, at 16k slots). */
void scan_forward(int R, int L, int E, int S, int T, int threads, const float *dt,
                  const float *xd, const float *A, const float *B, const float *C, float *y,
                  float *starts) {
  int chunks = (L + T - 1) / T;
  #pragma omp parallel for num_threads(threads)
  for (int r = 0; r < R; r++) {
    float *hr = calloc((size_t)E * S, sizeof(float));  /* the row's states, [E, S] */
    for (int c = 0; c < chunks; c++) {
      memcpy(starts + ((long)r * chunks + c) * E * S, hr, sizeof(float) * E * S);
      for (int e = 0; e < E; e++) {
        const float *a = A + ((long)r * E + e) * S;
        float *h = hr + (long)e * S;
        for (int t = c * T; t < L && t < (c + 1) * T; t++) {
          long i = AT(r, t, E) + e, j = AT(r, t, S);
          float d = dt[i], u = xd[i], acc = 0;
          #pragma omp simd reduction(+:acc)
          for (int s = 0; s < S; s++) {
            h[s] = expf(d * a[s]) * h[s] + u * B[j + s];  /* exp(Δ_t A) h_{t-1} + Δ_t B_t x_t */
            acc += h[s] * C[j + s];
          }
          y[i] = acc;
        }
      }
    }
    free(hr);
  }
}

/* dx = Δ G and ddt = Σ_s q A + x G (dΔ, before dΔ/ddt) [R, L, E]; dA [R, E, S] per row; dB, dC
   [R, L, S]; dA, dB and dC zeros on entry (sums over slots or channels) */
void scan_backward(int R, int L, int E, int S, int T, int threads, const float *x,
                   const float *dt, const float *xd, const float *A, const float *B,
                   const float *C, const float *gy, const float *starts, float *dx, float *ddt,
                   float *dA, float *dB, float *dC) {
  int chunks = (L + T - 1) / T;
  #pragma omp parallel for num_threads(threads)
  for (int r = 0; r < R; r++) {
    float *gr = calloc((size_t)E * S + (2 * T + 1) * S, sizeof(float));  /* a_{t+1} g_{t+1} */
    float *hs = gr + (long)E * S, *as = hs + (T + 1) * S;  /* a chunk's h and exp(Δ A) */
    for (int c = chunks - 1; c >= 0; c--) {
      int t0 = c * T, n = L - t0 < T ? L - t0 : T;
      for (int e = 0; e < E; e++) {
        const float *a = A + ((long)r * E + e) * S;
        float *g = gr + (long)e * S, *da = dA + ((long)r * E + e) * S;
        memcpy(hs, starts + (((long)r * chunks + c) * E + e) * S, sizeof(float) * S);
        for (int k = 0; k < n; k++) {  /* the chunk's states again: hs[k + 1] = h_{t0 + k} */
          long i = AT(r, t0 + k, E) + e, j = AT(r, t0 + k, S);
          #pragma omp simd
          for (int s = 0; s < S; s++) {
            as[k * S + s] = expf(dt[i] * a[s]);
            hs[(k + 1) * S + s] = as[k * S + s] * hs[k * S + s] + xd[i] * B[j + s];
          }
        }
        for (int k = n - 1; k >= 0; k--) {
          long i = AT(r, t0 + k, E) + e, j = AT(r, t0 + k, S);
          float d = dt[i], u = xd[i], gi = gy[i], G = 0, qa = 0;
          #pragma omp simd reduction(+:G, qa)
          for (int s = 0; s < S; s++) {
            float gs = gi * C[j + s] + g[s], q = gs * as[k * S + s] * hs[k * S + s];
            G += gs * B[j + s];  /* G_t = Σ_s g_t B_t */
            qa += q * a[s];
            da[s] += q * d;
            dB[j + s] += gs * u;
            dC[j + s] += hs[(k + 1) * S + s] * gi;
            g[s] = as[k * S + s] * gs;
          }
          dx[i] = d * G;
          ddt[i] = qa + x[i] * G;
        }
      }
    }
    free(gr);
  }
}
"""


@functools.lru_cache(maxsize=None)
def lib():
    """SOURCE compiled and loaded (once a process), or None after one warning where it fails: no
    compiler, no OpenMP, no writable temporary folder."""
    cc = os.environ.get("CC", "cc")
    try:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
            so = os.path.join(folder, "scan.so")
            subprocess.run([cc, "-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared",
                            "-fPIC", "-x", "c", "-", "-o", so, "-lm"], input=SOURCE, check=True,
                           capture_output=True, text=True, timeout=300)
            return ctypes.CDLL(so)
    except (OSError, subprocess.SubprocessError) as err:
        why = (getattr(err, "stderr", None) or str(err)).strip().splitlines()[0][:200]
        warnings.warn(f"selective_scan: {cc} could not build the C scan ({why}); running the "
                      f"torch path")
        return None


def _pointers(*tensors):  # the C loop's arguments: float32 and contiguous, or it reads garbage
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        raise ValueError("reorder_cpu: float32 contiguous tensors only")
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


def scan_forward(dt, xd, A, B, C, y, starts, T):
    """y = C · h [R, L, E] (without D x) and starts, the state before each chunk of T slots."""
    (R, L, E), S = dt.shape, B.shape[-1]
    lib().scan_forward(R, L, E, S, T, torch.get_num_threads(),
                       *_pointers(dt, xd, A, B, C, y, starts))


def scan_backward(x, dt, xd, A, B, C, gy, starts, dx, ddt, dA, dB, dC, T):
    """dx, ddt (dΔ) [R, L, E], dA [R, E, S], dB, dC [R, L, S] from gy; dA, dB, dC zeros on entry."""
    (R, L, E), S = dt.shape, B.shape[-1]
    lib().scan_backward(R, L, E, S, T, torch.get_num_threads(),
                        *_pointers(x, dt, xd, A, B, C, gy, starts, dx, ddt, dA, dB, dC))
