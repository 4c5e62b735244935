/* Vote counting in one pass over per-sample gradients (gradfix.native builds and loads this file;
 * it has no Python API and is called through ctypes).
 *
 *   grad_sum[j] += sum_b g[b, j]
 *   counts[j]   -= sum_b sign(g[b, j])        (the votes of the anti-gradient, sign(-g))
 *   returns how many samples b have some g[b, j] != 0
 *
 * g is row-major [samples, n].  Columns are split into blocks shared among the threads; a block
 * is visited sample by sample with its running sums in a local array, so that each value of g is
 * read once and the running sums stay in the first-level cache.
 */
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 1024

#define VOTE(NAME, T, C)                                                                        \
  int64_t NAME(const T *g, int64_t samples, int64_t n, T *grad_sum, C *counts, int32_t threads) { \
    int32_t *nonzero = (int32_t *)calloc(samples > 0 ? samples : 1, sizeof(int32_t));           \
    if (!nonzero) return -1;                                                                    \
    int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                           \
    for (int64_t k = 0; k < blocks; ++k) {                                                      \
      int64_t j0 = k * BLOCK, width = (j0 + BLOCK < n ? j0 + BLOCK : n) - j0;                   \
      T sum[BLOCK];                                                                             \
      int32_t vote[BLOCK];                                                                      \
      for (int64_t j = 0; j < width; ++j) {                                                     \
        sum[j] = grad_sum[j0 + j];                                                              \
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
        if (any) {                                                                              \
          int32_t seen;                                                                         \
          _Pragma("omp atomic read")                                                            \
          seen = nonzero[b];                                                                    \
          if (!seen) {                                                                          \
            _Pragma("omp atomic write")                                                         \
            nonzero[b] = 1;                                                                     \
          }                                                                                     \
        }                                                                                       \
      }                                                                                         \
      for (int64_t j = 0; j < width; ++j) {                                                     \
        grad_sum[j0 + j] = sum[j];                                                              \
        counts[j0 + j] = (C)(counts[j0 + j] - vote[j]);                                         \
      }                                                                                         \
    }                                                                                           \
    int64_t hits = 0;                                                                           \
    for (int64_t b = 0; b < samples; ++b) hits += nonzero[b] != 0;                              \
    free(nonzero);                                                                              \
    return hits;                                                                                \
  }

VOTE(gradfix_vote_f32_i16, float, int16_t)
VOTE(gradfix_vote_f32_i32, float, int32_t)
VOTE(gradfix_vote_f64_i16, double, int16_t)
VOTE(gradfix_vote_f64_i32, double, int32_t)
