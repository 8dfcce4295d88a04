// One Llama-family decoder layer for a small pure-decode batch on CPU, in a single call (shardline's
// own kernel; worker/layers/cpu_decode_layer.py says when it runs). At batch 1 a decode layer is
// ~60 small torch ops whose dispatch costs more than their arithmetic; here they are plain loops:
//
//   s = x + residual (residual absent: s = x);  h = rmsnorm(s) * w_in
//   qkv = h Wqkv^T (q4 block kernel);  q, k rotated: x * cos + roll(x, d / 2) * sin (sin's first half
//   negated, the rotary memo's form);  k, v stored at slot_mapping (row skipped when -1)
//   o = softmax(q k^T * scale) v over positions 0 .. seq_len - 1 of each row's own sequence (GQA)
//   s2 = o Wo^T + s;  h2 = rmsnorm(s2) * w_post;  a = silu(gate) * up of h2 Wgu^T;  out = a Wdown^T
//   returns (out, s2): the layer's output before its residual add, and the running residual
//
// float32 activations, cache [2, num_blocks, block_size, kv_heads, head_dim] float32 (the layout of
// worker/attention/metadata.py), block_tables [rows, max_blocks] int32, seq_lens [rows] int32,
// slot_mapping [rows] int64, cos / sin [rows, head_dim] float32. Weights: the q4 layout of
// block_matmul.cpp (codes uint8 [N, K / 2], fp16 scales and offsets [N, K / 32]).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "block_kernels.h"

namespace {

using namespace shardline_cpu;

struct Q4Weight {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* offsets;
  int64_t n;
  int64_t k;
};

Q4Weight q4_weight(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets, int64_t k,
                   const char* name) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) * 2 == k,
              "decode_layer: ", name, " codes must be contiguous uint8 [N, ", k / 2, "]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && offsets.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  offsets.is_contiguous() && scales.size(0) == codes.size(0) && scales.size(1) == k / kBlock &&
                  offsets.sizes() == scales.sizes(),
              "decode_layer: ", name, " scales / offsets must be contiguous float16 [N, K / 32]");
  return {reinterpret_cast<const uint8_t*>(codes.data_ptr()), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
          reinterpret_cast<const uint16_t*>(offsets.data_ptr()), codes.size(0), k};
}

void matmul(const Q4Weight& w, const float* x, int64_t m, float* y) {
  q4_int_dot_matmul(x, m, w.k, w.codes, w.scales, w.offsets, w.n, y);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp of 8 floats: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two parts for
// an exact product), e^r by its Taylor series to r^6 (|r| <= ln(2) / 2: truncation below 1.2e-7
// relative; the whole: at most 2.5e-7 relative over [-87, 88] against float64, emulated step by step
// in float32); x clamped to [-87, 88], where e^x stays a normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln 2, high part (exact product)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);   // ln 2, the rest
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// out = rmsnorm(s) * w for `rows` rows of `h` features.
void rms_norm(const float* s, const float* w, float eps, int64_t rows, int64_t h, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * h;
    const float inv = 1.0f / std::sqrt(dot(x, x, h) / static_cast<float>(h) + eps);
    for (int64_t i = 0; i < h; ++i) out[r * h + i] = w[i] * (x[i] * inv);
  }
}

// x [heads, d] rotated in place: x * cos + roll(x, d / 2) * sin.
void rotate(float* x, int64_t heads, int64_t d, const float* cos, const float* sin, float* tmp) {
  const int64_t half = d / 2;
  for (int64_t hd = 0; hd < heads; ++hd) {
    float* v = x + hd * d;
    for (int64_t i = 0; i < d; ++i) tmp[i] = v[i] * cos[i] + v[(i + half) % d] * sin[i];
    std::copy(tmp, tmp + d, v);
  }
}

std::tuple<at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, const at::Tensor& qkv_codes, const at::Tensor& qkv_scales,
    const at::Tensor& qkv_offsets, const at::Tensor& o_codes, const at::Tensor& o_scales, const at::Tensor& o_offsets,
    const at::Tensor& gu_codes, const at::Tensor& gu_scales, const at::Tensor& gu_offsets,
    const at::Tensor& down_codes, const at::Tensor& down_scales, const at::Tensor& down_offsets,
    const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& kv_cache, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
    double scale) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "decode_layer: x must be float32 [rows, hidden]");
  const int64_t m = x.size(0), hidden = x.size(1);
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat && kv_cache.is_contiguous() && kv_cache.dim() == 5 &&
                  kv_cache.size(0) == 2 && kv_cache.size(3) == num_kv_heads,
              "decode_layer: kv_cache must be contiguous float32 [2, blocks, block_size, kv_heads, head_dim]");
  const int64_t head_dim = kv_cache.size(4), block_size = kv_cache.size(2), num_blocks = kv_cache.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim % 2 == 0, "decode_layer: heads do not group");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
  const Q4Weight wqkv = q4_weight(qkv_codes, qkv_scales, qkv_offsets, hidden, "qkv");
  const Q4Weight wo = q4_weight(o_codes, o_scales, o_offsets, q_size, "o_proj");
  const Q4Weight wgu = q4_weight(gu_codes, gu_scales, gu_offsets, hidden, "gate_up");
  const int64_t inter = wgu.n / 2;
  const Q4Weight wdown = q4_weight(down_codes, down_scales, down_offsets, inter, "down");
  TORCH_CHECK(wqkv.n == qkv_size && wo.n == hidden && wdown.n == hidden, "decode_layer: weight shapes do not match");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.numel() == m * head_dim && sin.sizes() == cos.sizes(),
              "decode_layer: cos / sin must be float32 [rows, head_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && block_tables.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt && slot_mapping.numel() == m && block_tables.size(0) == m &&
                  seq_lens.numel() == m,
              "decode_layer: slot_mapping int64 [rows], block_tables int32 [rows, blocks], seq_lens int32 [rows]");
  const at::Tensor tables = block_tables.contiguous();

  at::Tensor residual = at::empty({m, hidden}, x.options());
  at::Tensor out = at::empty({m, hidden}, x.options());
  float* s = residual.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  if (residual_in.has_value()) {
    const at::Tensor r = residual_in->contiguous();
    TORCH_CHECK(r.sizes() == x.sizes() && r.scalar_type() == at::kFloat, "decode_layer: residual must match x");
    const float* rp = r.data_ptr<float>();
    for (int64_t i = 0; i < m * hidden; ++i) s[i] = xp[i] + rp[i];
  } else {
    std::copy(xp, xp + m * hidden, s);
  }

  std::vector<float> h(m * std::max(hidden, inter)), qkv(m * qkv_size), attn(m * q_size), gu(m * 2 * inter);
  rms_norm(s, input_norm.data_ptr<float>(), static_cast<float>(eps), m, hidden, h.data());
  matmul(wqkv, h.data(), m, qkv.data());

  float* cache = kv_cache.data_ptr<float>();
  const int64_t plane = num_blocks * block_size * kv_size;  // keys, then values
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  std::vector<float> tmp(head_dim);
  for (int64_t r = 0; r < m; ++r) {
    float* row = qkv.data() + r * qkv_size;
    const float* c = cos.data_ptr<float>() + r * head_dim;
    const float* sn = sin.data_ptr<float>() + r * head_dim;
    rotate(row, num_heads + num_kv_heads, head_dim, c, sn, tmp.data());  // q and k are adjacent
    if (slots[r] >= 0) {
      TORCH_CHECK(slots[r] < num_blocks * block_size, "decode_layer: slot ", slots[r], " is outside the cache");
      std::copy(row + q_size, row + q_size + kv_size, cache + slots[r] * kv_size);
      std::copy(row + q_size + kv_size, row + qkv_size, cache + plane + slots[r] * kv_size);
    }
  }

  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tab = tables.data_ptr<int32_t>();
  const int64_t max_blocks = tables.size(1), group = num_heads / num_kv_heads;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, m * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / num_heads, head = job % num_heads, kvh = head / group;
      const int64_t len = lens[r];
      TORCH_CHECK(len > 0 && (len + block_size - 1) / block_size <= max_blocks, "decode_layer: seq_len ", len,
                  " does not fit the block table");
      const float* q = qkv.data() + r * qkv_size + head * head_dim;
      scores.resize(len);
      float mx = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = static_cast<int64_t>(tab[r * max_blocks + p / block_size]) * block_size + p % block_size;
        scores[p] = dot(q, cache + slot * kv_size + kvh * head_dim, head_dim) * sc;
        mx = std::max(mx, scores[p]);
      }
      float total = 0.0f;
      int64_t p8 = 0;
      const __m256 vmx = _mm256_set1_ps(mx);
      __m256 vtotal = _mm256_setzero_ps();
      for (; p8 + 8 <= len; p8 += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + p8), vmx));
        _mm256_storeu_ps(scores.data() + p8, e);
        vtotal = _mm256_add_ps(vtotal, e);
      }
      total = hsum(vtotal);
      for (int64_t p = p8; p < len; ++p) {
        scores[p] = std::exp(scores[p] - mx);
        total += scores[p];
      }
      float* o = attn.data() + r * q_size + head * head_dim;
      std::fill(o, o + head_dim, 0.0f);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = static_cast<int64_t>(tab[r * max_blocks + p / block_size]) * block_size + p % block_size;
        const float* v = cache + plane + slot * kv_size + kvh * head_dim;
        const float wgt = scores[p] / total;
        for (int64_t i = 0; i < head_dim; ++i) o[i] += wgt * v[i];
      }
    }
  });

  matmul(wo, attn.data(), m, h.data());  // o_proj into h (hidden features)
  for (int64_t i = 0; i < m * hidden; ++i) s[i] += h[i];
  rms_norm(s, post_norm.data_ptr<float>(), static_cast<float>(eps), m, hidden, h.data());
  matmul(wgu, h.data(), m, gu.data());
  for (int64_t r = 0; r < m; ++r) {
    const float* g = gu.data() + r * 2 * inter;
    float* a = h.data() + r * inter;
    int64_t i = 0;
    for (; i + 8 <= inter; i += 8) {  // silu(g) * u = g / (1 + e^-g) * u
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(a + i, _mm256_mul_ps(silu, _mm256_loadu_ps(g + inter + i)));
    }
    for (; i < inter; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * g[inter + i];
  }
  matmul(wdown, h.data(), m, out.data_ptr<float>());
  return {out, residual};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardline_cpu, lib) {
  lib.def("decode_layer(Tensor x, Tensor? residual, Tensor input_norm, Tensor post_norm, float eps, "
          "Tensor qkv_codes, Tensor qkv_scales, Tensor qkv_offsets, Tensor o_codes, Tensor o_scales, Tensor o_offsets, "
          "Tensor gu_codes, Tensor gu_scales, Tensor gu_offsets, Tensor down_codes, Tensor down_scales, "
          "Tensor down_offsets, Tensor cos, Tensor sin, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor block_tables, "
          "Tensor seq_lens, int num_heads, int num_kv_heads, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shardline_cpu, CPU, lib) {
  lib.impl("decode_layer", &decode_layer);
}
