// panoray::most_uncertain_points (CPU): the importance-sampling step of the Mask2Former loss in
// one pass per mask.
//
// For each of R masks, read the (h, w) logit map bilinearly at K candidate points (zero padding,
// align_corners=False: pixel coordinate x * w - 0.5, the semantics of F.grid_sample and of the
// op's shared sampling header, whose bilinear_point reads the points near the borders) and
// return the k candidates whose |logit| is smallest, i.e. whose -|logit| uncertainty is highest,
// in candidate order. The Python path (grid_sample, top-k, gather) reads the same values and
// keeps the same set; this one builds no (R, K) uncertainty or index tensors, reads eight
// candidates at a time (AVX2 gathers, picked at run time) and selects by radix instead of a
// heap. A NaN logit counts as the most uncertain, as torch.topk ranks NaN above every number.
// Ties at the k-th value go to the earliest candidates.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../ms_deform_attn_sampling.h"
#include "x86_dispatch.h"

#if PANORAY_X86_DISPATCH
#include <immintrin.h>
#endif

namespace panoray {
namespace {

// The bilinear read of one (h, w) map at normalised (x, y), zero outside: the general case, out
// of line (the loops below take it only near the borders).
__attribute__((noinline)) float read_bilinear(const float* map, int64_t h, int64_t w, float x,
                                              float y) {
  BilinearPoint<float> p;
  if (!bilinear_point<float>(x, y, h, w, p)) return 0.0f;
  float value = 0.0f;
  for (int c = 0; c < 4; ++c) {
    if (p.valid[c]) value += map[p.offset[c]] * p.weight[c];
  }
  return value;
}

// An unsigned key ordering candidates from most to least uncertain: 0 for NaN, then |v| + 1 by
// its bit pattern (for non-negative floats the bit patterns sort as the numbers do).
PANORAY_ALWAYS_INLINE uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return v == v ? (bits & 0x7fffffffu) + 1 : 0u;
}

// The k-th smallest (1-based) of n keys, by radix selection on an 11-bit then a 21-bit digit: a
// histogram of the top digit over all keys, then only the keys in the bucket holding the k-th
// are copied to `scratch` and resolved there (11 + 10 bits). No data-dependent swaps, unlike
// nth_element, whose partitioning mispredicts on random data. `ties` receives how many keys
// equal to the result belong to the k smallest.
uint32_t kth_smallest(const uint32_t* keys, int64_t n, int64_t k, int64_t* ties,
                      std::vector<uint32_t>& scratch) {
  std::vector<int64_t> hist(2048, 0);
  for (int64_t j = 0; j < n; ++j) ++hist[keys[j] >> 21];
  int64_t rank = k;  // wanted rank among the keys that share the digits found so far
  uint32_t top = 0;
  while (rank > hist[top]) rank -= hist[top++];
  scratch.clear();
  for (int64_t j = 0; j < n; ++j) {
    if ((keys[j] >> 21) == top) scratch.push_back(keys[j]);
  }
  uint32_t prefix = top << 21, prefix_mask = 0x7ffu << 21;
  for (const auto& [shift, digit_mask] : {std::pair<int, uint32_t>{10, 0x7ffu}, {0, 0x3ffu}}) {
    std::fill(hist.begin(), hist.end(), 0);
    for (const uint32_t key : scratch) {
      if ((key & prefix_mask) == prefix) ++hist[(key >> shift) & digit_mask];
    }
    uint32_t digit = 0;
    while (rank > hist[digit]) rank -= hist[digit++];
    prefix |= digit << shift;
    prefix_mask |= digit_mask << shift;
  }
  *ties = rank;
  return prefix;
}

// Scores of K candidates on one map: order_key of the bilinear read at each. `padded` is the map
// with a ring of zeros, (h + 2) x (w + 2) (the caller zeroes it once; only the inside is
// written): the four corners of any point inside the map's extent (give or take half a pixel)
// lie in it, so the loop needs no bounds tests; other points take read_bilinear.
PANORAY_ALWAYS_INLINE void score_loop(const float* map, const float* padded, int64_t h, int64_t w,
                                      const float* cand, int64_t K, uint32_t* keys) {
  const int64_t pw = w + 2;
  const float fw = static_cast<float>(w), fh = static_cast<float>(h);
  for (int64_t j = 0; j < K; ++j) {
    const float x = cand[2 * j], y = cand[2 * j + 1];
    const float ix = x * fw - 0.5f;
    const float iy = y * fh - 0.5f;
    // ax, ay >= 0: truncating them gives floor(ix) + 1 and floor(iy) + 1, the column and row
    // in `padded`; the test is on the rounded values, so that the corners stay in `padded`.
    const float ax = ix + 1.0f, ay = iy + 1.0f;
    float v;
    if (ax >= 0.0f && ax < fw + 1.0f && ay >= 0.0f && ay < fh + 1.0f) {
      const int64_t px = static_cast<int64_t>(ax);
      const int64_t py = static_cast<int64_t>(ay);
      const float tx = ix - static_cast<float>(px - 1);
      const float ty = iy - static_cast<float>(py - 1);
      const float* top = padded + py * pw + px;
      const float* bottom = top + pw;
      v = top[0] * ((1.0f - tx) * (1.0f - ty)) + top[1] * (tx * (1.0f - ty)) +
          bottom[0] * ((1.0f - tx) * ty) + bottom[1] * (tx * ty);
    } else {
      v = read_bilinear(map, h, w, x, y);
    }
    keys[j] = order_key(v);
  }
}

#if PANORAY_X86_DISPATCH
// score_loop eight candidates at a time: the four corners come in by gathers from `padded`.
// Blocks with a point outside the fast range, and the tail, go through score_loop.
PANORAY_TARGET_AVX2 void score_loop_avx2(const float* map, const float* padded, int64_t h,
                                         int64_t w, const float* cand, int64_t K, uint32_t* keys) {
  const __m256 fw = _mm256_set1_ps(static_cast<float>(w));
  const __m256 fh = _mm256_set1_ps(static_cast<float>(h));
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  const __m256i row = _mm256_set1_epi32(static_cast<int>(w + 2));
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i one_i = _mm256_set1_epi32(1);
  int64_t j = 0;
  for (; j + 8 <= K; j += 8) {
    // (x0 y0 x1 y1 x2 y2 x3 y3), (x4 y4 ... y7) -> x0..x7 and y0..y7
    const __m256 a = _mm256_loadu_ps(cand + 2 * j);
    const __m256 b = _mm256_loadu_ps(cand + 2 * j + 8);
    const __m256 x = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    const __m256 y = _mm256_castpd_ps(_mm256_permute4x64_pd(
        _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
    const __m256 ix = _mm256_sub_ps(_mm256_mul_ps(x, fw), half);  // pixel coordinates
    const __m256 iy = _mm256_sub_ps(_mm256_mul_ps(y, fh), half);
    const __m256 inside = _mm256_and_ps(
        _mm256_and_ps(_mm256_cmp_ps(ix, minus_one, _CMP_GE_OQ), _mm256_cmp_ps(ix, fw, _CMP_LT_OQ)),
        _mm256_and_ps(_mm256_cmp_ps(iy, minus_one, _CMP_GE_OQ), _mm256_cmp_ps(iy, fh, _CMP_LT_OQ)));
    if (_mm256_movemask_ps(inside) != 0xff) {
      score_loop(map, padded, h, w, cand + 2 * j, 8, keys + j);
      continue;
    }
    const __m256 x0 = _mm256_floor_ps(ix), y0 = _mm256_floor_ps(iy);
    const __m256 tx = _mm256_sub_ps(ix, x0), ty = _mm256_sub_ps(iy, y0);
    const __m256 ux = _mm256_sub_ps(one, tx), uy = _mm256_sub_ps(one, ty);
    // corner (x0, y0) sits at padded[(y0 + 1) * (w + 2) + x0 + 1]
    const __m256i top = _mm256_add_epi32(
        _mm256_mullo_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(y0), one_i), row),
        _mm256_add_epi32(_mm256_cvttps_epi32(x0), one_i));
    const __m256i bottom = _mm256_add_epi32(top, row);
    const __m256 v00 = _mm256_i32gather_ps(padded, top, 4);
    const __m256 v01 = _mm256_i32gather_ps(padded + 1, top, 4);
    const __m256 v10 = _mm256_i32gather_ps(padded, bottom, 4);
    const __m256 v11 = _mm256_i32gather_ps(padded + 1, bottom, 4);
    __m256 v = _mm256_mul_ps(v00, _mm256_mul_ps(ux, uy));
    v = _mm256_add_ps(v, _mm256_mul_ps(v01, _mm256_mul_ps(tx, uy)));
    v = _mm256_add_ps(v, _mm256_mul_ps(v10, _mm256_mul_ps(ux, ty)));
    v = _mm256_add_ps(v, _mm256_mul_ps(v11, _mm256_mul_ps(tx, ty)));
    // order_key: (|v| bits) + 1, and 0 for NaN
    const __m256i key = _mm256_add_epi32(_mm256_and_si256(_mm256_castps_si256(v), abs_mask), one_i);
    const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + j), _mm256_and_si256(key, ordered));
  }
  score_loop(map, padded, h, w, cand + 2 * j, K - j, keys + j);
}
#endif

void score_candidates(const float* map, int64_t h, int64_t w, const float* cand, int64_t K,
                      float* padded, uint32_t* keys) {
  const int64_t pw = w + 2;
  for (int64_t y = 0; y < h; ++y) {
    std::copy(map + y * w, map + (y + 1) * w, padded + (y + 1) * pw + 1);
  }
#if PANORAY_X86_DISPATCH
  if (use_avx2()) return score_loop_avx2(map, padded, h, w, cand, K, keys);
#endif
  score_loop(map, padded, h, w, cand, K, keys);
}

at::Tensor most_uncertain_points_cpu(const at::Tensor& logits, const at::Tensor& candidates,
                                     int64_t k) {
  TORCH_CHECK(logits.dim() == 3, "most_uncertain_points: logits must be (R, h, w), got shape ",
              logits.sizes(), ".");
  TORCH_CHECK(candidates.dim() == 3 && candidates.size(2) == 2,
              "most_uncertain_points: candidates must be (R, K, 2), got shape ",
              candidates.sizes(), ".");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && candidates.scalar_type() == at::kFloat,
              "most_uncertain_points: logits and candidates must be float32, got ",
              logits.scalar_type(), " and ", candidates.scalar_type(), ".");
  const int64_t R = logits.size(0), h = logits.size(1), w = logits.size(2);
  const int64_t K = candidates.size(1);
  TORCH_CHECK(h > 0 && w > 0, "most_uncertain_points: the logit maps are empty (", h, " x ", w,
              ").");
  TORCH_CHECK((h + 2) * (w + 2) < (int64_t{1} << 31), "most_uncertain_points: logit maps of ", h,
              " x ", w, " are too large.");
  TORCH_CHECK(candidates.size(0) == R, "most_uncertain_points: ", R, " logit maps but ",
              candidates.size(0), " candidate sets.");
  TORCH_CHECK(k >= 0 && k <= K, "most_uncertain_points: k must be in [0, ", K, "], got ", k,
              ".");
  const at::Tensor maps = logits.contiguous();
  const at::Tensor points = candidates.contiguous();
  at::Tensor out = at::empty({R, k, 2}, points.options());
  if (R == 0 || k == 0) return out;
  const float* maps_data = maps.const_data_ptr<float>();
  const float* points_data = points.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();

  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(K), scratch;
    std::vector<float> padded((h + 2) * (w + 2), 0.0f);  // its zero ring is never written
    for (int64_t r = begin; r < end; ++r) {
      const float* cand = points_data + r * K * 2;
      score_candidates(maps_data + r * h * w, h, w, cand, K, padded.data(), keys.data());
      int64_t ties = 0;
      const uint32_t kth = kth_smallest(keys.data(), K, k, &ties, scratch);
      // Every key below the k-th is taken, then the first `ties` candidates equal to it.
      float* dst = out_data + r * k * 2;
      for (int64_t j = 0, n = 0; j < K && n < k; ++j) {
        if (keys[j] < kth || (keys[j] == kth && ties-- > 0)) {
          dst[2 * n] = cand[2 * j];
          dst[2 * n + 1] = cand[2 * j + 1];
          ++n;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(panoray, CPU, m) {
  m.impl("most_uncertain_points", &most_uncertain_points_cpu);
}

}  // namespace panoray
