/* The selective scan of reorder.selective_scan as one C loop per pass, for CPU tensors. Optional:
   reorder.py compiles this file with the system's C compiler at first use (one process, a private
   temporary folder) and runs its torch path where that fails or the file is missing.

   The math is selective_scan's (its docstring has the recurrence and the gradients). Each (row r,
   channel e) keeps its state h [S] in registers while it walks the L slots, instead of torch's few
   ops per slot on [rows, channels, S] slices: the per-op overhead that bound the torch path. As
   there, the forward pass stores the state before every chunk of T slots (starts [R, L / T, E, S]),
   and the backward pass walks the chunks last to first, recomputes a chunk's states from its start
   into a scratch of T + 1 states, then runs g_t = C_t gy_t + a_{t+1} g_{t+1} backwards through it.
   Float32, contiguous: x, dt (= Δ, after its softplus), xd (= Δ x), gy [R, L, E]; A [R, E, S] (each
   row its core's); B, C [R, L, S]. Rows are split between `threads` threads. */
#include <math.h>
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
