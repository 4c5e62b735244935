/* Vote counting over per-sample gradients (gradfix.native builds and loads this file; it has no
 * Python API and is called through ctypes).  Every function adds to running sums
 *
 *   grad_sum[j] += sum_b g_b[j]
 *   counts[j]   -= sum_b sign(g_b[j])        (the votes of the anti-gradient, sign(-g))
 *
 * for the coordinates of a range [begin, end) of work units, sets nonzero[b] = 1 for every sample
 * b with some g_b[j] != 0 among them, and returns 0 (-1 when out of memory).  grad_sum may be NULL
 * (a vote that keeps its counts only): the sums are then not written anywhere.  Counters are int8,
 * int16 or int32; the caller picks one that holds the number of samples voted (|counts| <= n).
 *
 * gradfix_vote_*: the per-sample gradients are given, row-major [samples, n].  A unit is a block
 * of BLOCK columns (gradfix_vote_units); a block is visited sample by sample with its running sums
 * in a local array, so that each value of g is read once and the running sums stay in cache.
 *
 * gradfix_linear_*: the per-sample gradients of a linear weight, g_b = d_b^T x_b, are formed here
 * from the layer's output gradients d ([samples, tokens, out]) and inputs x ([samples, tokens,
 * in]), one register tile of R x W coordinates at a time, and counted while still in registers:
 * they are never written to memory.  A unit is GROUP neighbouring tiles of one row block
 * (gradfix_linear_units_*); a tile's running sums stay local for all samples and are written once.
 *
 * There are no threads here: the caller splits the units into ranges and calls these functions
 * from its own threads, several ranges per thread taken as they come, so that a thread the system
 * deschedules holds up one range, not a fixed share.  Ranges never share a coordinate: each
 * coordinate's sum is added by one call in sample order (and a product over tokens in token order),
 * so grad_sum is the same bits however the units are split.  Only the flags in nonzero are shared,
 * written with relaxed atomic stores of the same value.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024

/* Flag sample b as having a non-zero gradient (several calls may flag the same sample at once). */
static inline void mark(int32_t *nonzero, int64_t b) {
  if (!__atomic_load_n(nonzero + b, __ATOMIC_RELAXED)) __atomic_store_n(nonzero + b, 1, __ATOMIC_RELAXED);
}

/* How many units gradfix_vote_* splits n columns into. */
int64_t gradfix_vote_units(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

#define VOTE(NAME, T, C)                                                                        \
  int64_t NAME(const T *g, int64_t samples, int64_t n, T *grad_sum, C *counts, int64_t begin,     \
               int64_t end, int32_t *nonzero) {                                                 \
    for (int64_t k = begin; k < end; ++k) {                                                     \
      int64_t j0 = k * BLOCK, width = (j0 + BLOCK < n ? j0 + BLOCK : n) - j0;                   \
      T sum[BLOCK];                                                                             \
      int32_t vote[BLOCK];                                                                      \
      for (int64_t j = 0; j < width; ++j) {                                                     \
        sum[j] = grad_sum ? grad_sum[j0 + j] : 0;                                               \
        vote[j] = 0;                                                                            \
      }                                                                                         \
      for (int64_t b = 0; b < samples; ++b) {                                                   \
        const T *row = g + b * n + j0;                                                          \
        int32_t any = 0;                                                                        \
        for (int64_t j = 0; j < width; ++j) {                                                   \
          T x = row[j];                                                                         \
          sum[j] += x;                                                                          \
          vote[j] += (x > 0) - (x < 0);                                                         \
          any |= x != 0;                                                                        \
        }                                                                                       \
        if (any) mark(nonzero, b);                                                              \
      }                                                                                         \
      if (grad_sum)                                                                             \
        for (int64_t j = 0; j < width; ++j) grad_sum[j0 + j] = sum[j];                          \
      for (int64_t j = 0; j < width; ++j) counts[j0 + j] = (C)(counts[j0 + j] - vote[j]);      \
    }                                                                                           \
    return 0;                                                                                   \
  }

VOTE(gradfix_vote_f32_i8, float, int8_t)
VOTE(gradfix_vote_f32_i16, float, int16_t)
VOTE(gradfix_vote_f32_i32, float, int32_t)
VOTE(gradfix_vote_f64_i8, double, int8_t)
VOTE(gradfix_vote_f64_i16, double, int16_t)
VOTE(gradfix_vote_f64_i32, double, int32_t)

/* Tiles are visited GROUP column blocks at a time for each row block: the inputs of those columns
 * (all samples) stay in the core's cache while the row blocks go by, and the output gradients are
 * read in/(W * GROUP) times instead of in/W. */
#ifndef GROUP
#define GROUP 4
#endif

/* Register tiles: R rows x W columns of accumulators (AVX-512: 32 vector registers). */
#if defined(R32)
/* set by the compiler's command line (tuning experiments) */
#elif defined(__AVX512F__)
#define R32 12
#define W32 32
#define R64 12
#define W64 16
#else
#define R32 6
#define W32 16
#define R64 6
#define W64 8
#endif

#define LINEAR(NAME, T, C, R, W)                                                                \
  int64_t NAME##_units(int64_t out, int64_t in) {                                               \
    return ((in + W - 1) / W + GROUP - 1) / GROUP * ((out + R - 1) / R);                        \
  }                                                                                             \
  int64_t NAME(const T *dg, const T *x, int64_t samples, int64_t tokens, int64_t out, int64_t in, \
               T *grad_sum, C *counts, int64_t begin, int64_t end, int32_t *nonzero) {          \
    int64_t iblocks = (in + W - 1) / W, oblocks = (out + R - 1) / R;                            \
    T *pad = NULL; /* an edge tile is computed on zero-padded copies of its panels */           \
    for (int64_t k = begin; k < end; ++k) {                                                     \
      int64_t ob = k % oblocks, ib_end = (k / oblocks + 1) * GROUP;                             \
      for (int64_t ib = (k / oblocks) * GROUP; ib < (ib_end < iblocks ? ib_end : iblocks); ++ib) { \
        int64_t i0 = ib * W, o0 = ob * R;                                                       \
        int64_t rows = out - o0 < R ? out - o0 : R, cols = in - i0 < W ? in - i0 : W;          \
        int edge = rows < R || cols < W;                                                        \
        if (edge && !pad) {                                                                     \
          pad = (T *)calloc((size_t)tokens * (R + W), sizeof(T));                               \
          if (!pad) return -1;                                                                  \
        }                                                                                       \
        if (edge) memset(pad, 0, sizeof(T) * (size_t)tokens * (R + W));                         \
        T gs[R][W];                                                                             \
        int32_t vt[R][W];                                                                       \
        for (int r = 0; r < R; ++r)                                                             \
          for (int w = 0; w < W; ++w) {                                                         \
            gs[r][w] = grad_sum && r < rows && w < cols ? grad_sum[(o0 + r) * in + i0 + w] : 0; \
            vt[r][w] = 0;                                                                       \
          }                                                                                     \
        for (int64_t b = 0; b < samples; ++b) {                                                 \
          const T *d = dg + b * tokens * out + o0, *xb = x + b * tokens * in + i0;              \
          int64_t dstride = out, xstride = in;                                                  \
          if (edge) {                                                                           \
            T *dp = pad, *xp = pad + (size_t)tokens * R;                                        \
            for (int64_t t = 0; t < tokens; ++t) {                                              \
              memcpy(dp + t * R, d + t * out, sizeof(T) * (size_t)rows);                        \
              memcpy(xp + t * W, xb + t * in, sizeof(T) * (size_t)cols);                        \
            }                                                                                   \
            d = dp;                                                                             \
            xb = xp;                                                                            \
            dstride = R;                                                                        \
            xstride = W;                                                                        \
          }                                                                                     \
          T acc[R][W];                                                                          \
          for (int r = 0; r < R; ++r)                                                           \
            for (int w = 0; w < W; ++w) acc[r][w] = 0;                                          \
          for (int64_t t = 0; t < tokens; ++t) {                                                \
            const T *xr = xb + t * xstride, *dr = d + t * dstride;                              \
            for (int r = 0; r < R; ++r) {                                                       \
              T a = dr[r];                                                                      \
              _Pragma("omp simd")                                                               \
              for (int w = 0; w < W; ++w) acc[r][w] += a * xr[w];                               \
            }                                                                                   \
          }                                                                                     \
          int32_t any = 0;                                                                      \
          for (int r = 0; r < R; ++r) {                                                         \
            _Pragma("omp simd reduction(|:any)")                                                \
            for (int w = 0; w < W; ++w) {                                                       \
              T v = acc[r][w];                                                                  \
              gs[r][w] += v;                                                                    \
              vt[r][w] += (v > 0) - (v < 0);                                                    \
              any |= v != 0;                                                                    \
            }                                                                                   \
          }                                                                                     \
          if (any) mark(nonzero, b);                                                            \
        }                                                                                       \
        for (int64_t r = 0; r < rows; ++r)                                                      \
          for (int64_t w = 0; w < cols; ++w) {                                                  \
            int64_t j = (o0 + r) * in + i0 + w;                                                 \
            if (grad_sum) grad_sum[j] = gs[r][w];                                               \
            counts[j] = (C)(counts[j] - vt[r][w]);                                              \
          }                                                                                     \
      }                                                                                         \
    }                                                                                           \
    free(pad);                                                                                  \
    return 0;                                                                                   \
  }

LINEAR(gradfix_linear_f32_i8, float, int8_t, R32, W32)
LINEAR(gradfix_linear_f32_i16, float, int16_t, R32, W32)
LINEAR(gradfix_linear_f32_i32, float, int32_t, R32, W32)
LINEAR(gradfix_linear_f64_i8, double, int8_t, R64, W64)
LINEAR(gradfix_linear_f64_i16, double, int16_t, R64, W64)
LINEAR(gradfix_linear_f64_i32, double, int32_t, R64, W64)
