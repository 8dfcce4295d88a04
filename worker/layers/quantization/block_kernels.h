// AVX2 building blocks of shardline's block-quantized CPU kernels, shared by block_matmul.cpp (the
// matmul ops) and decode_layer.cpp (a whole decoder layer for small decode batches). The weight
// layout and the error of the integer path are described in block_matmul.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace shardline_cpu {

constexpr int64_t kBlock = 32;
// The most rows of x the q4 integer-dot path takes (more go to the dequantized-slab GEMM). Pairs of
// activation rows share each unpacked weight block (dot_4rows<2>) while the weights stream from
// memory once; the cost still grows with M. Against float32 (one thread, the default model's four
// shapes, 30 distinct copies each): pairs 1.5-1.8x at 8 rows, 0.9-1.3x at 16, 0.8-0.9x at 32
// (one row at a time had been 1.1-1.2x at 8 and 0.8x at 16).
constexpr int64_t kIntDotMaxRows = 16;
// The most rows the q8 path multiplies as float32 activations times widened codes (the LM head).
constexpr int64_t kFloatRowsMaxRows = 4;
constexpr int64_t kTileRows = 64;       // the fewest weight rows dequantized at once by the GEMM path
constexpr int64_t kSlabBytes = 4 << 20;   // the most float32 bytes dequantized at once by the GEMM path

// Activation rows quantized per 32-block: codes, scale, exact float sum.
struct QuantizedActivations {
  std::vector<int8_t> codes;   // [M, K]
  std::vector<float> scale;    // [M, K / 32]
  std::vector<float> sum;      // [M, K / 32]
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void quantize_block(const float* x, int8_t* q, float* scale, float* sum) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  __m256 s = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
    s = _mm256_add_ps(s, v[i]);
  }
  const float m = hmax(amax);
  const float d = m / 127.0f;
  const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i) {
    i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // pack 32 int32 -> 32 int8 in order (packs interleave 128-bit lanes; permute restores the order)
  __m256i a = _mm256_packs_epi32(i32[0], i32[1]);
  __m256i b = _mm256_packs_epi32(i32[2], i32[3]);
  __m256i c = _mm256_packs_epi16(a, b);
  c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), c);
  *scale = d;
  *sum = hsum(s);
}

inline QuantizedActivations quantize_activations(const float* x, int64_t m, int64_t k) {
  QuantizedActivations a;
  const int64_t nb = k / kBlock;
  a.codes.resize(m * k);
  a.scale.resize(m * nb);
  a.sum.resize(m * nb);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      quantize_block(x + r * k + b * kBlock, a.codes.data() + r * k + b * kBlock, &a.scale[r * nb + b], &a.sum[r * nb + b]);
    }
  }
  return a;
}

// fp16 [n] -> float [n]
inline void half_to_float(const uint16_t* h, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
  for (; i < n; ++i) f[i] = _cvtsh_ss(h[i]);
}

inline __m256i unpack_q4(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, lo_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lo_mask);
  return _mm256_set_m128i(hi, lo);
}

// The integer dot product of one 32-weight q4 block with one block of int8 activations, as 8 int32
// lanes (unsigned 4-bit codes x signed int8 activations).
inline __m256i block_dot(const uint8_t* w, const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_q4(w), x), ones);
}

// One q4 weight row against one activation row: sum_b d_b dx_b <q_b, xq_b> + m_b sum_b.
// `scale` holds d_b * dx_b for this row pair; two accumulators hide the FMA latency.
inline float dot_row(const uint8_t* w, const float* scale, const float* off, const int8_t* xq, const float* xsum,
                     int64_t nb) {
  constexpr int64_t kBytes = kBlock / 2;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    // the next row (rows are nb * kBytes apart): weights stream from memory at batch 1
    if ((b * kBytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (nb + b) * kBytes), _MM_HINT_T0);
    acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + b), _mm256_cvtepi32_ps(block_dot(w + b * kBytes, xq + b * kBlock)), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + b + 1),
                           _mm256_cvtepi32_ps(block_dot(w + (b + 1) * kBytes, xq + (b + 1) * kBlock)), acc1);
  }
  if (b < nb) {
    acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + b), _mm256_cvtepi32_ps(block_dot(w + b * kBytes, xq + b * kBlock)), acc0);
  }
  int64_t i = 0;
  for (; i + 8 <= nb; i += 8) acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(off + i), _mm256_loadu_ps(xsum + i), acc1);
  float y = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < nb; ++i) y += off[i] * xsum[i];
  return y;
}

// q4 weight row `row` against every activation row: y[r, row] for r < M.
inline void dot_rows(const uint8_t* w, const uint16_t* d16, const uint16_t* m16, const QuantizedActivations& a, int64_t m,
                     int64_t k, float* y_col, int64_t n, float* d, float* off, float* scale) {
  const int64_t nb = k / kBlock;
  half_to_float(d16, d, nb);
  half_to_float(m16, off, nb);
  for (int64_t r = 0; r < m; ++r) {
    const float* dx = a.scale.data() + r * nb;
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) _mm256_storeu_ps(scale + i, _mm256_mul_ps(_mm256_loadu_ps(d + i), _mm256_loadu_ps(dx + i)));
    for (; i < nb; ++i) scale[i] = d[i] * dx[i];
    y_col[r * n] = dot_row(w, scale, off, a.codes.data() + r * k, a.sum.data() + r * nb, nb);
  }
}

// Four q4 weight rows (row_bytes apart) against kRows activation rows r, r + 1, ...: out[4 rr + j] =
// weight row j's dot product with activation row r + rr. Each weight block is unpacked once for
// the kRows rows (kRows = 2 is what makes the integer path pay at 9-16 rows) and each activation
// block loaded once for the four weight rows; 4 kRows accumulators keep the FMAs independent.
// sc holds 4 kRows nb floats of scratch.
template <int kRows>
inline void dot_4rows(const uint8_t* w, int64_t row_bytes, const uint16_t* d16, const uint16_t* m16,
                      const QuantizedActivations& a, int64_t r, int64_t k, float* sc, float* out) {
  constexpr int64_t kBytes = kBlock / 2;
  const int64_t nb = k / kBlock;
  for (int64_t i = 0; i < 4 * nb * 2; i += 64) {  // the next four rows' scales and offsets
    _mm_prefetch(reinterpret_cast<const char*>(d16 + 4 * nb) + i, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m16 + 4 * nb) + i, _MM_HINT_T0);
  }
  for (int j = 0; j < 4; ++j) {  // sc[(4 rr + j) nb + b] = d_jb * dx_(r + rr)b
    half_to_float(d16 + j * nb, sc + j * nb, nb);
    for (int rr = kRows - 1; rr >= 0; --rr) {  // row 0 last: it scales sc's own d values in place
      const float* dx = a.scale.data() + (r + rr) * nb;
      for (int64_t b = 0; b < nb; ++b) sc[(4 * rr + j) * nb + b] = sc[j * nb + b] * dx[b];
    }
  }
  __m256 acc[4 * kRows];
  for (int i = 0; i < 4 * kRows; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i x[kRows];
    for (int rr = 0; rr < kRows; ++rr) {
      x[rr] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.codes.data() + (r + rr) * k + b * kBlock));
    }
    for (int j = 0; j < 4; ++j) {
      const uint8_t* wb = w + j * row_bytes + b * kBytes;
      if ((b * kBytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + 8 * row_bytes), _MM_HINT_T0);
      const __m256i wu = unpack_q4(wb);
      for (int rr = 0; rr < kRows; ++rr) {
        const __m256i p = _mm256_maddubs_epi16(wu, x[rr]);
        acc[4 * rr + j] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + (4 * rr + j) * nb + b),
                                          _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc[4 * rr + j]);
      }
    }
  }
  for (int rr = 0; rr < kRows; ++rr) {
    // + sum_b m_jb * sum(x_b), the offsets against the exact block sums
    const float* xsum = a.sum.data() + (r + rr) * nb;
    for (int j = 0; j < 4; ++j) {
      const uint16_t* mj = m16 + j * nb;
      __m256 t = acc[4 * rr + j];
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) {
        t = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mj + b))),
                            _mm256_loadu_ps(xsum + b), t);
      }
      float tail = 0.0f;
      for (; b < nb; ++b) tail += _cvtsh_ss(mj[b]) * xsum[b];
      acc[4 * rr + j] = _mm256_add_ps(t, _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
    }
    // four horizontal sums at once: hadd pairs, then add the 128-bit halves
    const __m256 h01 = _mm256_hadd_ps(acc[4 * rr], acc[4 * rr + 1]);
    const __m256 h23 = _mm256_hadd_ps(acc[4 * rr + 2], acc[4 * rr + 3]);
    const __m256 h = _mm256_hadd_ps(h01, h23);  // lane i (and i + 4): partial sums of row i
    _mm_storeu_ps(out + 4 * rr, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
}

// y [M, N] = x [M, K] W^T for q4 weights on the integer path (M small: each weight row is read from
// memory once for all M activation rows).
inline void q4_int_dot_matmul(const float* x, int64_t m, int64_t k, const uint8_t* w, const uint16_t* d16,
                              const uint16_t* m16, int64_t n, float* y) {
  const int64_t nb = k / kBlock;
  const int64_t row_bytes = k / 2;
  const QuantizedActivations a = quantize_activations(x, m, k);
  const int64_t groups = (n + 3) / 4;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> d(nb), off(nb), scale(nb), sc(8 * nb);
    float out[8];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t row = 4 * g;
      if (row + 4 <= n) {
        int64_t r = 0;
        for (; r + 2 <= m; r += 2) {  // pairs of activation rows, then the odd one
          dot_4rows<2>(w + row * row_bytes, row_bytes, d16 + row * nb, m16 + row * nb, a, r, k, sc.data(), out);
          for (int j = 0; j < 4; ++j) {
            y[r * n + row + j] = out[j];
            y[(r + 1) * n + row + j] = out[4 + j];
          }
        }
        for (; r < m; ++r) {
          dot_4rows<1>(w + row * row_bytes, row_bytes, d16 + row * nb, m16 + row * nb, a, r, k, sc.data(), out);
          for (int j = 0; j < 4; ++j) y[r * n + row + j] = out[j];
        }
        continue;
      }
      for (int64_t rr = row; rr < n; ++rr) {  // the last rows, one at a time
        dot_rows(w + rr * row_bytes, d16 + rr * nb, m16 + rr * nb, a, m, k, y + rr, n, d.data(), off.data(),
                 scale.data());
      }
    }
  });
}

}  // namespace shardline_cpu
