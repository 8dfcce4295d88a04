// Block-quantized weight matmuls on x86 CPUs with AVX2 + FMA + F16C (shardline's own kernels;
// docs/quantization.md says where they run and what they cost in accuracy).
//
// Weights are stored in 32-weight blocks along the input features, one fp16 scale d (and, for the
// 4-bit kind, one fp16 offset m) per block of each output row:
//   q4: codes uint8 [N, K / 2], block b of row n in bytes [16 b, 16 b + 16); byte j holds weight j in
//       its low nibble and weight j + 16 in its high nibble (GGUF's Q4 layout); w = d * q + m, q in 0..15
//   q8: codes int8 [N, K]; w = d * q
// y = x W^T for float32 x [M, K] (K a multiple of 32), y float32 [M, N]:
//   * M <= kIntDotMaxRows: each 32-block of an activation row is quantized to int8 with its own scale
//     dx = max|x| / 127 (round to nearest), and each block's dot product is an integer one
//     (_mm256_maddubs_epi16: unsigned 4-bit codes x signed int8 activations, or |w| x sign(w) x for q8),
//     scaled by d dx; the q4 offset term uses the block's exact float sum m * sum(x). The error per
//     output is at most sum over blocks of |d| * sum(q) * dx / 2 (q4) or |d| sum|q| dx / 2 (q8).
//   * larger M: each thread dequantizes a tile of rows to float32 once and multiplies it with
//     at::mm (the float GEMM); the result equals x times the dequantized weights up to float32 rounding.
// Parallel over output rows with at::parallel_for (the intra-op threads, OMP_NUM_THREADS).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kIntDotMaxRows = 4;   // rows of x handled together by the integer-dot path
constexpr int64_t kTileRows = 64;       // weight rows dequantized at once by the GEMM path

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

void quantize_block(const float* x, int8_t* q, float* scale, float* sum) {
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

QuantizedActivations quantize_activations(const float* x, int64_t m, int64_t k) {
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

// The integer dot product of one 32-weight block with one block of int8 activations, as 8 int32 lanes.
template <bool kQ4>
inline __m256i block_dot(const uint8_t* w, const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  __m256i wu;
  if constexpr (kQ4) {
    wu = unpack_q4(w);
  } else {
    const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    wu = _mm256_sign_epi8(wq, wq);  // |w| (codes are in -127..127)
    x = _mm256_sign_epi8(x, wq);    // x * sign(w)
  }
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wu, x), ones);
}

// One weight row against activation row `row`: sum_b d_b dx_b <q_b, xq_b> (+ m_b sum_b).
// `scale` holds d_b * dx_b for this row pair; two accumulators hide the FMA latency.
template <bool kQ4>
inline float dot_row(const uint8_t* w, const float* scale, const float* off, const int8_t* xq, const float* xsum,
                     int64_t nb) {
  constexpr int64_t kBytes = kQ4 ? kBlock / 2 : kBlock;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + b), _mm256_cvtepi32_ps(block_dot<kQ4>(w + b * kBytes, xq + b * kBlock)), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + b + 1),
                           _mm256_cvtepi32_ps(block_dot<kQ4>(w + (b + 1) * kBytes, xq + (b + 1) * kBlock)), acc1);
  }
  if (b < nb) {
    acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + b), _mm256_cvtepi32_ps(block_dot<kQ4>(w + b * kBytes, xq + b * kBlock)), acc0);
  }
  if constexpr (kQ4) {
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(off + i), _mm256_loadu_ps(xsum + i), acc1);
    float y = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < nb; ++i) y += off[i] * xsum[i];
    return y;
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

// Weight row `row` against every activation row: y[r, row] for r < M.
template <bool kQ4>
void dot_rows(const uint8_t* w, const uint16_t* d16, const uint16_t* m16, const QuantizedActivations& a, int64_t m,
              int64_t k, float* y_col, int64_t n, float* d, float* off, float* scale) {
  const int64_t nb = k / kBlock;
  half_to_float(d16, d, nb);
  if constexpr (kQ4) half_to_float(m16, off, nb);
  for (int64_t r = 0; r < m; ++r) {
    const float* dx = a.scale.data() + r * nb;
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) _mm256_storeu_ps(scale + i, _mm256_mul_ps(_mm256_loadu_ps(d + i), _mm256_loadu_ps(dx + i)));
    for (; i < nb; ++i) scale[i] = d[i] * dx[i];
    y_col[r * n] = dot_row<kQ4>(w, scale, off, a.codes.data() + r * k, a.sum.data() + r * nb, nb);
  }
}

// Weight row n dequantized to float [K].
template <bool kQ4>
void dequantize_row(const uint8_t* w, const float* d, const float* off, int64_t k, float* out) {
  const int64_t nb = k / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i q;
    if constexpr (kQ4) {
      q = unpack_q4(w + b * (kBlock / 2));
    } else {
      q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlock));
    }
    const __m256 dv = _mm256_set1_ps(d[b]);
    const __m256 mv = _mm256_set1_ps(kQ4 ? off[b] : 0.0f);
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 2; ++j) {
        const __m128i bytes = j == 0 ? halves[h] : _mm_srli_si128(halves[h], 8);
        const __m256i i32 = kQ4 ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes);
        _mm256_storeu_ps(out + b * kBlock + h * 16 + j * 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), dv, mv));
      }
    }
  }
}

void check_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* offsets,
                int64_t k_codes_per_row) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), "block_matmul: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "block_matmul: x must be float32 [M, K]");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kBlock == 0, "block_matmul: K = ", k, " is not a multiple of 32");
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == k_codes_per_row && codes.is_contiguous(),
              "block_matmul: codes must be contiguous [N, ", k_codes_per_row, "]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == codes.size(0) && scales.size(1) == k / kBlock,
              "block_matmul: scales must be contiguous float16 [N, K / 32]");
  if (offsets != nullptr) {
    TORCH_CHECK(offsets->scalar_type() == at::kHalf && offsets->is_contiguous() && offsets->sizes() == scales.sizes(),
                "block_matmul: offsets must be contiguous float16 [N, K / 32]");
  }
}

template <bool kQ4>
at::Tensor block_matmul(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor* offsets) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0), nb = k / kBlock;
  const int64_t row_bytes = kQ4 ? k / 2 : k;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const uint16_t* d16 = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* m16 = offsets != nullptr ? reinterpret_cast<const uint16_t*>(offsets->data_ptr()) : nullptr;
  if (m == 0) return at::zeros({0, n}, x.options());
  if (m <= kIntDotMaxRows) {
    at::Tensor y = at::empty({m, n}, x.options());
    float* yp = y.data_ptr<float>();
    const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), m, k);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> d(nb), off(nb), scale(nb);
      for (int64_t row = begin; row < end; ++row) {
        dot_rows<kQ4>(w + row * row_bytes, d16 + row * nb, kQ4 ? m16 + row * nb : nullptr, a, m, k, yp + row, n,
                      d.data(), off.data(), scale.data());
      }
    });
    return y;
  }
  // y^T [N, M]: tile t of weight rows gives rows of y^T, a contiguous slice for at::mm_out.
  at::Tensor yt = at::empty({n, m}, x.options());
  const at::Tensor xt = x.t();
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kTileRows, k}, x.options());
    float* tp = tile.data_ptr<float>();
    std::vector<float> d(nb), off(kQ4 ? nb : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kTileRows, rows = std::min(kTileRows, n - r0);
      for (int64_t r = 0; r < rows; ++r) {
        half_to_float(d16 + (r0 + r) * nb, d.data(), nb);
        if constexpr (kQ4) half_to_float(m16 + (r0 + r) * nb, off.data(), nb);
        dequantize_row<kQ4>(w + (r0 + r) * row_bytes, d.data(), off.data(), k, tp + r * k);
      }
      at::Tensor out = yt.narrow(0, r0, rows);
      at::mm_out(out, tile.narrow(0, 0, rows), xt);
    }
  });
  return yt.t().contiguous();
}

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets) {
  check_args(x, codes, scales, &offsets, x.size(1) / 2);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "q4_matmul: codes must be uint8");
  return block_matmul<true>(x, codes, scales, &offsets);
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_args(x, codes, scales, nullptr, x.size(1));
  TORCH_CHECK(codes.scalar_type() == at::kChar, "q8_matmul: codes must be int8");
  return block_matmul<false>(x, codes, scales, nullptr);
}

// Activation quantization alone (the tests' view of what the integer path multiplies):
// (codes int8 [M, K], scales float32 [M, K / 32]).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) % kBlock == 0,
              "quantize_rows: x must be float32 [M, K] with K a multiple of 32");
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), m, k);
  at::Tensor codes = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m, k / kBlock}, x.options());
  std::copy(a.codes.begin(), a.codes.end(), codes.data_ptr<int8_t>());
  std::copy(a.scale.begin(), a.scale.end(), scale.data_ptr<float>());
  return {codes, scale};
}

}  // namespace

TORCH_LIBRARY(shardline_cpu, lib) {
  lib.def("q4_matmul(Tensor x, Tensor codes, Tensor scales, Tensor offsets) -> Tensor");
  lib.def("q8_matmul(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  lib.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shardline_cpu, CPU, lib) {
  lib.impl("q4_matmul", &q4_matmul);
  lib.impl("q8_matmul", &q8_matmul);
  lib.impl("quantize_rows", &quantize_rows);
}
