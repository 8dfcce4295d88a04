// Block-quantized weight matmuls on x86 CPUs with AVX2 + FMA + F16C (shardline's own kernels;
// docs/quantization.md says where they run and what they cost in accuracy).
//
// Weights are stored in 32-weight blocks along the input features, one fp16 scale d (and, for the
// 4-bit kind, one fp16 offset m) per block of each output row:
//   q4: codes uint8 [N, K / 2], block b of row n in bytes [16 b, 16 b + 16); byte j holds weight j in
//       its low nibble and weight j + 16 in its high nibble (GGUF's Q4 layout); w = d * q + m, q in 0..15
//   q8: codes int8 [N, K]; w = d * q
// y = x W^T for float32 x [M, K] (K a multiple of 32), y float32 [M, N]:
//   * q8, M <= kFloatRowsMaxRows: float32 activations times the widened codes (float32 rounding only:
//     the LM head, whose logits pick the token, keeps the activations exact).
//   * q4, M <= kIntDotMaxRows: each 32-block of an activation row is quantized to int8 with its own scale
//     dx = max|x| / 127 (round to nearest), and each block's dot product is an integer one
//     (_mm256_maddubs_epi16: unsigned 4-bit codes x signed int8 activations), scaled by d dx; the
//     offset term uses the block's exact float sum m * sum(x). The error per output is at most the
//     sum over blocks of |d| * sum(q) * dx / 2. (q8 weights have no integer path: int8 activations
//     moved the default model's first answer token; see q8_float_rows.)
//   * larger M: slabs of weight rows are dequantized to float32 once per call and multiplied with
//     at::mm (the float GEMM, parallel itself); the result equals x times the dequantized weights up to float32 rounding.
// Parallel over output rows with at::parallel_for (the intra-op threads, OMP_NUM_THREADS).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "block_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace shardline_cpu;

// q8 weights against float32 activations, M small: each 32-block's 8-bit codes are widened to float
// and multiplied by x as it is (no activation rounding: the LM head's logits, where int8 activations
// moved the default model's first answer token). out[r * n] = row . x_r for r < m.
void q8_float_rows(const int8_t* w, const uint16_t* d16, const float* x, int64_t m, int64_t k, float* d,
                   float* out, int64_t n) {
  const int64_t nb = k / kBlock;
  half_to_float(d16, d, nb);
  _mm_prefetch(reinterpret_cast<const char*>(w + k), _MM_HINT_T0);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* wb = w + b * kBlock;
      if (r == 0 && b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * k), _MM_HINT_T0);
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16));
      const float* xb = xr + b * kBlock;
      __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(xb));
      t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(xb + 8), t);
      __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(xb + 16));
      u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(xb + 24), u);
      const __m256 db = _mm256_set1_ps(d[b]);
      acc0 = _mm256_fmadd_ps(db, t, acc0);
      acc1 = _mm256_fmadd_ps(db, u, acc1);
    }
    out[r * n] = hsum(_mm256_add_ps(acc0, acc1));
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
                        const at::Tensor* offsets, int64_t int_dot_max_rows = kIntDotMaxRows) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0), nb = k / kBlock;
  const int64_t row_bytes = kQ4 ? k / 2 : k;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const uint16_t* d16 = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* m16 = offsets != nullptr ? reinterpret_cast<const uint16_t*>(offsets->data_ptr()) : nullptr;
  if (m == 0) return at::zeros({0, n}, x.options());
  if (m <= (kQ4 ? std::min(int_dot_max_rows, kIntDotMaxRows) : kFloatRowsMaxRows)) {
    at::Tensor y = at::empty({m, n}, x.options());
    float* yp = y.data_ptr<float>();
    if constexpr (kQ4) {
      q4_int_dot_matmul(x.data_ptr<float>(), m, k, w, d16, m16, n, yp);
    } else {
      const float* xp = x.data_ptr<float>();
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> d(nb);
        for (int64_t row = begin; row < end; ++row) {
          q8_float_rows(reinterpret_cast<const int8_t*>(w) + row * k, d16 + row * nb, xp, m, k, d.data(), yp + row, n);
        }
      });
    }
    return y;
  }
  // Dequantize a slab of weight rows and multiply it with one float GEMM call, y[:, slab] = x slab^T:
  // large GEMMs run near oneDNN's float32 rate, small tiles did not (0.7-0.9x of float32 at 64-256
  // rows). A slab holds at most kSlabBytes of float32, or as much as the output y itself when that
  // is larger (the buffer at most doubles the call's memory); the slabs split the rows evenly.
  // Splitting costs: gate/up 3072x576 at M = 2048 ran at 0.79x of float32 in slabs of 1820 + 1252
  // rows with a copy into y, 0.90x writing y in place, 0.98x in one slab.
  const int64_t slab_limit = std::max<int64_t>(kSlabBytes, 4 * m * n);
  const int64_t slabs = std::max<int64_t>(1, (4 * n * k + slab_limit - 1) / slab_limit);
  const int64_t slab_rows = std::max<int64_t>(kTileRows, (n + slabs - 1) / slabs);
  at::Tensor y = slab_rows < n ? at::empty({m, n}, x.options()) : at::Tensor();
  at::Tensor slab = at::empty({std::min(slab_rows, n), k}, x.options());
  float* sp = slab.data_ptr<float>();
  for (int64_t r0 = 0; r0 < n; r0 += slab_rows) {
    const int64_t rows = std::min(slab_rows, n - r0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> d(nb), off(kQ4 ? nb : 0);
      for (int64_t r = begin; r < end; ++r) {
        half_to_float(d16 + (r0 + r) * nb, d.data(), nb);
        if constexpr (kQ4) half_to_float(m16 + (r0 + r) * nb, off.data(), nb);
        dequantize_row<kQ4>(w + (r0 + r) * row_bytes, d.data(), off.data(), k, sp + r * k);
      }
    });
    if (rows == n) return at::mm(x, slab.t());
    // straight into y's columns (row stride n): the GEMM writes them in place, no copy
    at::Tensor cols = y.narrow(1, r0, rows);
    at::mm_out(cols, x, slab.narrow(0, 0, rows).t());
  }
  return y;
}

// int_dot_max_rows: the most rows taken on the integer path in this call (at most kIntDotMaxRows;
// 0: always the float GEMM, as for steps that hold prompt rows: block_cpu.py).
at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                     int64_t int_dot_max_rows) {
  check_args(x, codes, scales, &offsets, x.size(1) / 2);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "q4_matmul: codes must be uint8");
  return block_matmul<true>(x, codes, scales, &offsets, int_dot_max_rows);
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

// The most activation rows q4_matmul multiplies with integer dot products (kIntDotMaxRows).
int64_t q4_int_dot_max_rows() { return kIntDotMaxRows; }

}  // namespace

TORCH_LIBRARY(shardline_cpu, lib) {
  lib.def("q4_matmul(Tensor x, Tensor codes, Tensor scales, Tensor offsets, int int_dot_max_rows) -> Tensor");
  lib.def("q8_matmul(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  lib.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  lib.def("q4_int_dot_max_rows() -> int", &q4_int_dot_max_rows);  // no tensors: one kernel for every device
}

TORCH_LIBRARY_IMPL(shardline_cpu, CPU, lib) {
  lib.impl("q4_matmul", &q4_matmul);
  lib.impl("q8_matmul", &q8_matmul);
  lib.impl("quantize_rows", &quantize_rows);
}
