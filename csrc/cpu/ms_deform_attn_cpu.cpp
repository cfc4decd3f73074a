// CPU kernels of panoray::ms_deform_attn (float64, float32, bfloat16, float16; accumulation in
// float for the 16-bit types).
//
// value is (B, S, nH, C), so the C channels of one sampled corner are contiguous: the inner
// loops run over channels and vectorise (`omp simd`). On x86-64 the row loops are compiled for
// AVX2 + FMA next to the baseline and picked at run time, so the wheel still runs on older CPUs.
//
// Forward: parallel over (batch, query) rows. Backward: parallel over (batch, head, level) tasks;
// every task owns a disjoint slice of grad_value (the rows of its level, the channels of its
// head) and of grad_sampling_locations / grad_attention_weights, so no atomics are needed.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_sampling.h"
#include "x86_dispatch.h"


#if defined(__GNUC__)
#define PANORAY_PREFETCH(address, for_write) __builtin_prefetch((address), (for_write))
#else
#define PANORAY_PREFETCH(address, for_write) ((void)0)
#endif

namespace panoray {
namespace {

// How many queries ahead the backward loop prefetches its strided per-query data.
constexpr int64_t kPrefetchQueries = 4;

// Prefetches the bytes [p, p + bytes) a cache line at a time.
inline void prefetch_span(const void* p, int64_t bytes, int for_write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) {
    if (for_write) {
      PANORAY_PREFETCH(c + i, 1);
    } else {
      PANORAY_PREFETCH(c + i, 0);
    }
  }
}

template <typename scalar_t>
struct Inputs {
  const scalar_t* value;          // (B, S, nH, C)
  const int64_t* spatial_shapes;  // (L, 2)
  const int64_t* level_start;     // (L,)
  const scalar_t* locations;      // (B, Q, nH, L, P, 2)
  const scalar_t* attention;      // (B, Q, nH, L, P)
  MsDeformAttnSizes s;
};

// Output rows [begin, end) of the flattened (B, Q) axis: out (B, Q, nH, C).
template <typename scalar_t>
PANORAY_ALWAYS_INLINE void forward_rows(const Inputs<scalar_t>& in, scalar_t* out, int64_t begin,
                                        int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = in.s;
  const int64_t C = s.C;
  std::vector<acc_t> acc_buf(C);
  const std::vector<scalar_t> zeros(C, scalar_t(0));  // read for corners outside the map
  acc_t* __restrict__ acc = acc_buf.data();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / s.Q;
    const scalar_t* value_b = in.value + b * s.S * s.nH * C;
    for (int64_t h = 0; h < s.nH; ++h) {
      for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
      const int64_t point0 = (row * s.nH + h) * s.L * s.P;
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t level_h = in.spatial_shapes[2 * l];
        const int64_t level_w = in.spatial_shapes[2 * l + 1];
        const scalar_t* value_l = value_b + (in.level_start[l] * s.nH + h) * C;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t point = point0 + l * s.P + p;
          BilinearPoint<acc_t> bp;
          if (!bilinear_point<acc_t>(static_cast<acc_t>(in.locations[2 * point]),
                                     static_cast<acc_t>(in.locations[2 * point + 1]), level_h,
                                     level_w, bp)) {
            continue;
          }
          acc_t scaled[4];
          attention_scaled_weights<acc_t>(bp, static_cast<acc_t>(in.attention[point]), scaled);
          const scalar_t* corner[4];
          for (int i = 0; i < 4; ++i) {
            corner[i] = bp.valid[i] ? value_l + bp.offset[i] * s.nH * C : zeros.data();
          }
          const scalar_t* __restrict__ v0 = corner[0];
          const scalar_t* __restrict__ v1 = corner[1];
          const scalar_t* __restrict__ v2 = corner[2];
          const scalar_t* __restrict__ v3 = corner[3];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            acc[c] = bilinear_accumulate<acc_t>(acc[c], scaled, static_cast<acc_t>(v0[c]),
                                                static_cast<acc_t>(v1[c]),
                                                static_cast<acc_t>(v2[c]),
                                                static_cast<acc_t>(v3[c]));
          }
        }
      }
      scalar_t* out_row = out + (row * s.nH + h) * C;
      for (int64_t c = 0; c < C; ++c) out_row[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// Tasks [begin, end) of the flattened (B, nH, L) axis. grad_value_acc (B, S, nH, C) in the
// accumulation type; the task zeroes its own slice first.
template <typename scalar_t>
PANORAY_ALWAYS_INLINE void backward_tasks(const Inputs<scalar_t>& in, const scalar_t* grad_out,
                                          at::opmath_type<scalar_t>* grad_value_acc,
                                          scalar_t* grad_locations, scalar_t* grad_attention,
                                          int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = in.s;
  const int64_t C = s.C;
  const int64_t row_stride = s.nH * C;  // between pixels of one head in value / grad_value
  const std::vector<scalar_t> zeros(C, scalar_t(0));
  // Corners outside the map read `zeros` and write these scratch rows (one each, so that the
  // four written rows never alias).
  std::vector<acc_t> scratch(4 * C);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t l = task % s.L;
    const int64_t h = (task / s.L) % s.nH;
    const int64_t b = task / (s.L * s.nH);
    const int64_t level_h = in.spatial_shapes[2 * l];
    const int64_t level_w = in.spatial_shapes[2 * l + 1];
    const int64_t level_offset = ((b * s.S + in.level_start[l]) * s.nH + h) * C;
    const scalar_t* value_l = in.value + level_offset;
    acc_t* grad_value_l = grad_value_acc + level_offset;
    for (int64_t pixel = 0; pixel < level_h * level_w; ++pixel) {
      acc_t* row = grad_value_l + pixel * row_stride;
      for (int64_t c = 0; c < C; ++c) row[c] = acc_t(0);
    }
    for (int64_t q = 0; q < s.Q; ++q) {
      const scalar_t* __restrict__ g = grad_out + ((b * s.Q + q) * s.nH + h) * C;
      const int64_t point0 = (((b * s.Q + q) * s.nH + h) * s.L + l) * s.P;
      if (q + kPrefetchQueries < s.Q) {
        // This task reads and writes one small strided block per query; the hardware prefetcher
        // does not follow such strides across pages.
        const int64_t ahead = kPrefetchQueries * s.nH * s.L * s.P;
        prefetch_span(in.locations + 2 * (point0 + ahead), 2 * s.P * sizeof(scalar_t), 0);
        prefetch_span(in.attention + point0 + ahead, s.P * sizeof(scalar_t), 0);
        prefetch_span(grad_locations + 2 * (point0 + ahead), 2 * s.P * sizeof(scalar_t), 1);
        prefetch_span(grad_attention + point0 + ahead, s.P * sizeof(scalar_t), 1);
        prefetch_span(g + kPrefetchQueries * s.nH * C, C * sizeof(scalar_t), 0);
      }
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t point = point0 + p;
        const acc_t attention = static_cast<acc_t>(in.attention[point]);
        BilinearPoint<acc_t> bp;
        if (!bilinear_point<acc_t>(static_cast<acc_t>(in.locations[2 * point]),
                                   static_cast<acc_t>(in.locations[2 * point + 1]), level_h,
                                   level_w, bp)) {
          grad_attention[point] = scalar_t(0);
          grad_locations[2 * point] = scalar_t(0);
          grad_locations[2 * point + 1] = scalar_t(0);
          continue;
        }
        acc_t scaled[4];
        attention_scaled_weights<acc_t>(bp, attention, scaled);
        const scalar_t* corner[4];
        acc_t* grad_corner[4];
        for (int i = 0; i < 4; ++i) {
          corner[i] = bp.valid[i] ? value_l + bp.offset[i] * row_stride : zeros.data();
          grad_corner[i] =
              bp.valid[i] ? grad_value_l + bp.offset[i] * row_stride : scratch.data() + i * C;
        }
        const scalar_t* __restrict__ v0 = corner[0];
        const scalar_t* __restrict__ v1 = corner[1];
        const scalar_t* __restrict__ v2 = corner[2];
        const scalar_t* __restrict__ v3 = corner[3];
        acc_t* __restrict__ gv0 = grad_corner[0];
        acc_t* __restrict__ gv1 = grad_corner[1];
        acc_t* __restrict__ gv2 = grad_corner[2];
        acc_t* __restrict__ gv3 = grad_corner[3];
        const acc_t s0 = scaled[0], s1 = scaled[1], s2 = scaled[2], s3 = scaled[3];
        acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gc = static_cast<acc_t>(g[c]);
          d0 += gc * static_cast<acc_t>(v0[c]);
          d1 += gc * static_cast<acc_t>(v1[c]);
          d2 += gc * static_cast<acc_t>(v2[c]);
          d3 += gc * static_cast<acc_t>(v3[c]);
          gv0[c] += s0 * gc;
          gv1[c] += s1 * gc;
          gv2[c] += s2 * gc;
          gv3[c] += s3 * gc;
        }
        const acc_t dots[4] = {d0, d1, d2, d3};
        acc_t grad_attn, grad_x, grad_y;
        bilinear_point_grads<acc_t>(bp, dots, attention, level_h, level_w, grad_attn, grad_x,
                                    grad_y);
        grad_attention[point] = static_cast<scalar_t>(grad_attn);
        grad_locations[2 * point] = static_cast<scalar_t>(grad_x);
        grad_locations[2 * point + 1] = static_cast<scalar_t>(grad_y);
      }
    }
  }
}

// The row loops of one dtype, compiled for the baseline and (on x86-64) for AVX2 + FMA; the
// *_any overloads pick one at run time.
#if PANORAY_X86_DISPATCH
#define PANORAY_DEFINE_AVX2_LOOPS(scalar_t, suffix)                                             \
  PANORAY_TARGET_AVX2 void forward_rows_##suffix##_avx2(const Inputs<scalar_t>& in,             \
                                                        scalar_t* out, int64_t begin,           \
                                                        int64_t end) {                          \
    forward_rows<scalar_t>(in, out, begin, end);                                                \
  }                                                                                             \
  PANORAY_TARGET_AVX2 void backward_tasks_##suffix##_avx2(                                      \
      const Inputs<scalar_t>& in, const scalar_t* grad_out,                                     \
      at::opmath_type<scalar_t>* grad_value_acc, scalar_t* grad_locations,                      \
      scalar_t* grad_attention, int64_t begin, int64_t end) {                                   \
    backward_tasks<scalar_t>(in, grad_out, grad_value_acc, grad_locations, grad_attention,      \
                             begin, end);                                                       \
  }
#define PANORAY_CALL_AVX2(call) \
  if (use_avx2()) return call;
#else
#define PANORAY_DEFINE_AVX2_LOOPS(scalar_t, suffix)
#define PANORAY_CALL_AVX2(call)
#endif

#define PANORAY_DEFINE_LOOPS(scalar_t, suffix)                                                  \
  PANORAY_DEFINE_AVX2_LOOPS(scalar_t, suffix)                                                   \
  void forward_rows_any(const Inputs<scalar_t>& in, scalar_t* out, int64_t begin,               \
                        int64_t end) {                                                          \
    PANORAY_CALL_AVX2(forward_rows_##suffix##_avx2(in, out, begin, end))                        \
    forward_rows<scalar_t>(in, out, begin, end);                                                \
  }                                                                                             \
  void backward_tasks_any(const Inputs<scalar_t>& in, const scalar_t* grad_out,                 \
                          at::opmath_type<scalar_t>* grad_value_acc, scalar_t* grad_locations,  \
                          scalar_t* grad_attention, int64_t begin, int64_t end) {               \
    PANORAY_CALL_AVX2(backward_tasks_##suffix##_avx2(in, grad_out, grad_value_acc,              \
                                                     grad_locations, grad_attention, begin,     \
                                                     end))                                      \
    backward_tasks<scalar_t>(in, grad_out, grad_value_acc, grad_locations, grad_attention,      \
                             begin, end);                                                       \
  }

PANORAY_DEFINE_LOOPS(double, f64)
PANORAY_DEFINE_LOOPS(float, f32)
PANORAY_DEFINE_LOOPS(c10::BFloat16, bf16)
PANORAY_DEFINE_LOOPS(c10::Half, f16)
#undef PANORAY_DEFINE_LOOPS
#undef PANORAY_DEFINE_AVX2_LOOPS
#undef PANORAY_CALL_AVX2

// Value checks of spatial_shapes / level_start_index (cheap on CPU): positive sizes, levels that
// tile value's S axis in order, so that no corner can be read outside value.
void check_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const MsDeformAttnSizes& s) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t expected_start = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[",
                l, "] = (", shapes[2 * l], ", ", shapes[2 * l + 1], ") must be positive.");
    TORCH_CHECK(starts[l] == expected_start, "ms_deform_attn: level_start_index[", l, "] is ",
                starts[l], " but spatial_shapes put level ", l, " at ", expected_start,
                "; use the exclusive cumsum of h * w.");
    expected_start += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK(expected_start == s.S, "ms_deform_attn: spatial_shapes cover ", expected_start,
              " tokens but value has S = ", s.S, ".");
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights, const MsDeformAttnSizes& s) {
  return Inputs<scalar_t>{value.data_ptr<scalar_t>(),
                          spatial_shapes.data_ptr<int64_t>(),
                          level_start_index.data_ptr<int64_t>(),
                          sampling_locations.data_ptr<scalar_t>(),
                          attention_weights.data_ptr<scalar_t>(),
                          s};
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, int64_t im2col_step) {
  const MsDeformAttnSizes s = check_ms_deform_attn_args(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step);
  check_levels(spatial_shapes, level_start_index, s);
  at::Tensor out = at::empty({s.B, s.Q, s.nH * s.C}, value.options());
  if (out.numel() == 0) return out.zero_();
  // Enough work per task to amortise the scheduling: ~16k corner-channel products.
  const int64_t per_row = s.nH * s.L * s.P * s.C * 4;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu", [&] {
        const Inputs<scalar_t> in = make_inputs<scalar_t>(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
        scalar_t* out_ptr = out.data_ptr<scalar_t>();
        at::parallel_for(0, s.B * s.Q, grain, [&](int64_t begin, int64_t end) {
          forward_rows_any(in, out_ptr, begin, end);
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, int64_t im2col_step) {
  const MsDeformAttnSizes s =
      check_ms_deform_attn_backward_args(grad_output, value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, im2col_step);
  check_levels(spatial_shapes, level_start_index, s);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::empty(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_attention = at::empty_like(attention_weights);
  if (value.numel() == 0 || sampling_locations.numel() == 0) {
    return {grad_value_acc.zero_().to(value.scalar_type()), grad_locations.zero_(),
            grad_attention.zero_()};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Inputs<scalar_t> in = make_inputs<scalar_t>(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
        const scalar_t* grad_out_ptr = grad_output.data_ptr<scalar_t>();
        acc_t* grad_value_ptr = grad_value_acc.data_ptr<acc_t>();
        scalar_t* grad_loc_ptr = grad_locations.data_ptr<scalar_t>();
        scalar_t* grad_attn_ptr = grad_attention.data_ptr<scalar_t>();
        at::parallel_for(0, s.B * s.nH * s.L, 1, [&](int64_t begin, int64_t end) {
          backward_tasks_any(in, grad_out_ptr, grad_value_ptr, grad_loc_ptr, grad_attn_ptr, begin,
                             end);
        });
      });
  return {grad_value_acc.to(value.scalar_type()), grad_locations, grad_attention};
}

}  // namespace

TORCH_LIBRARY_IMPL(panoray, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace panoray
