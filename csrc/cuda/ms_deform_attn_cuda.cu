// CUDA kernels of panoray::ms_deform_attn: float32, float16, bfloat16 (and float64) inputs with
// float32 (float64) accumulation, launched on the current stream
// (c10::cuda::getCurrentCUDAStream, the same stream as at::cuda::getCurrentCUDAStream).
//
// Forward: one thread per output element (b, q, head, channel); neighbouring threads read
// neighbouring channels of a corner, so the loads coalesce. Backward: one warp per sampling
// point (b, q, head, level, point), lanes over channels; it atomically adds into grad_value,
// kept in the accumulation type (a float32 buffer for 16-bit inputs, cast at the end), and
// reduces the four corner dot products across the warp for the point's own gradients.
//
// im2col_step: the batch is processed in chunks of im2col_step elements, one launch each (the
// meaning it has in Deformable-DETR); results do not depend on it.
//
// spatial_shapes / level_start_index stay on the device and are not read on the host (no
// synchronisation). The Python wrapper validates them eagerly; in the kernels a level whose
// extent falls outside value is skipped, so inconsistent ones cannot read or write out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_sampling.h"

namespace panoray {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size
constexpr int kWarp = 32;

int64_t num_blocks(int64_t n) {
  // Grid-stride loops cover the rest; 2^20 blocks keep every SM busy.
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// Level l's (h, w, start) when it lies inside value's S axis; false otherwise.
__device__ inline bool level_extent(const int64_t* spatial_shapes, const int64_t* level_start,
                                    int64_t l, int64_t S, int64_t& h, int64_t& w,
                                    int64_t& start) {
  h = spatial_shapes[2 * l];
  w = spatial_shapes[2 * l + 1];
  start = level_start[l];
  return h > 0 && w > 0 && start >= 0 && h <= S && w <= S && start + h * w <= S;
}

// Batch elements [b0, b0 + nb). out (B, Q, nH, C).
template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start,
                               const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ attention,
                               scalar_t* __restrict__ out, MsDeformAttnSizes s, int64_t b0,
                               int64_t nb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = nb * s.Q * s.nH * s.C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = i % s.C;
    const int64_t h = (i / s.C) % s.nH;
    const int64_t q = (i / (s.C * s.nH)) % s.Q;
    const int64_t b = b0 + i / (s.C * s.nH * s.Q);
    const int64_t row = (b * s.Q + q) * s.nH + h;  // (b, q, h)
    acc_t acc = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      int64_t level_h, level_w, start;
      if (!level_extent(spatial_shapes, level_start, l, s.S, level_h, level_w, start)) continue;
      const scalar_t* value_l = value + ((b * s.S + start) * s.nH + h) * s.C + c;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t point = (row * s.L + l) * s.P + p;
        BilinearPoint<acc_t> bp;
        if (!bilinear_point<acc_t>(static_cast<acc_t>(locations[2 * point]),
                                   static_cast<acc_t>(locations[2 * point + 1]), level_h, level_w,
                                   bp)) {
          continue;
        }
        acc_t scaled[4];
        attention_scaled_weights<acc_t>(bp, static_cast<acc_t>(attention[point]), scaled);
        acc_t v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          v[k] = bp.valid[k] ? static_cast<acc_t>(value_l[bp.offset[k] * s.nH * s.C]) : acc_t(0);
        }
        acc = bilinear_accumulate<acc_t>(acc, scaled, v[0], v[1], v[2], v[3]);
      }
    }
    out[row * s.C + c] = static_cast<scalar_t>(acc);
  }
}

// Batch elements [b0, b0 + nb). grad_value_acc (B, S, nH, C) zero-initialised, accumulation type.
// One warp per sampling point, its lanes over the channels: the atomics of a warp hit consecutive
// addresses, and the four corner dot products are summed across the warp before
// bilinear_point_grads (the order the CPU kernel uses too). Every lane of a warp walks the same
// points, so the full-mask shuffles are safe.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ spatial_shapes,
                                const int64_t* __restrict__ level_start,
                                const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ attention,
                                at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
                                scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_attention, MsDeformAttnSizes s,
                                int64_t b0, int64_t nb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = nb * s.Q * s.nH * s.L * s.P;
  const int64_t row_stride = s.nH * s.C;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / kWarp;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; i < n; i += warps) {
    const int64_t point = b0 * s.Q * s.nH * s.L * s.P + i;  // (b, q, h, l, p)
    const int64_t l = (point / s.P) % s.L;
    const int64_t row = point / (s.P * s.L);  // (b, q, h)
    const int64_t h = row % s.nH;
    const int64_t b = row / (s.nH * s.Q);
    int64_t level_h, level_w, start;
    BilinearPoint<acc_t> bp;
    if (!(level_extent(spatial_shapes, level_start, l, s.S, level_h, level_w, start) &&
          bilinear_point<acc_t>(static_cast<acc_t>(locations[2 * point]),
                                static_cast<acc_t>(locations[2 * point + 1]), level_h, level_w,
                                bp))) {
      if (lane == 0) {
        grad_attention[point] = scalar_t(0);
        grad_locations[2 * point] = scalar_t(0);
        grad_locations[2 * point + 1] = scalar_t(0);
      }
      continue;
    }
    const acc_t attn = static_cast<acc_t>(attention[point]);
    acc_t scaled[4];
    attention_scaled_weights<acc_t>(bp, attn, scaled);
    const int64_t level_offset = ((b * s.S + start) * s.nH + h) * s.C;
    const scalar_t* g = grad_out + row * s.C;
    acc_t dots[4] = {0, 0, 0, 0};
    for (int64_t c = lane; c < s.C; c += kWarp) {
      const acc_t gc = static_cast<acc_t>(g[c]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!bp.valid[k]) continue;
        const int64_t idx = level_offset + bp.offset[k] * row_stride + c;
        dots[k] += gc * static_cast<acc_t>(value[idx]);
        atomicAdd(grad_value_acc + idx, scaled[k] * gc);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        dots[k] += __shfl_xor_sync(0xffffffffu, dots[k], offset);
      }
    }
    if (lane == 0) {
      acc_t grad_attn, grad_x, grad_y;
      bilinear_point_grads<acc_t>(bp, dots, attn, level_h, level_w, grad_attn, grad_x, grad_y);
      grad_attention[point] = static_cast<scalar_t>(grad_attn);
      grad_locations[2 * point] = static_cast<scalar_t>(grad_x);
      grad_locations[2 * point + 1] = static_cast<scalar_t>(grad_y);
    }
  }
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights, int64_t im2col_step) {
  const MsDeformAttnSizes s = check_ms_deform_attn_args(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({s.B, s.Q, s.nH * s.C}, value.options());  // every element written
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
        for (int64_t b0 = 0; b0 < s.B; b0 += im2col_step) {
          const int64_t nb = std::min(im2col_step, s.B - b0);
          forward_kernel<scalar_t>
              <<<num_blocks(nb * s.Q * s.nH * s.C), kThreads, 0, stream>>>(
                  value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                  level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
                  attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s, b0, nb);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, int64_t im2col_step) {
  const MsDeformAttnSizes s =
      check_ms_deform_attn_backward_args(grad_output, value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, im2col_step);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations = at::zeros_like(sampling_locations);
  at::Tensor grad_attention = at::zeros_like(attention_weights);
  if (value.numel() != 0 && sampling_locations.numel() != 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          for (int64_t b0 = 0; b0 < s.B; b0 += im2col_step) {
            const int64_t nb = std::min(im2col_step, s.B - b0);
            backward_kernel<scalar_t>
                <<<num_blocks(nb * s.Q * s.nH * s.L * s.P * kWarp), kThreads, 0, stream>>>(
                    grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                    spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                    sampling_locations.data_ptr<scalar_t>(),
                    attention_weights.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(),
                    grad_locations.data_ptr<scalar_t>(), grad_attention.data_ptr<scalar_t>(), s,
                    b0, nb);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_locations, grad_attention};
}

}  // namespace

TORCH_LIBRARY_IMPL(panoray, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace panoray
