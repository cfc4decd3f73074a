// Shared declarations of the panoray::ms_deform_attn op: argument checks used by every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace panoray {

// Sizes of one call: value (B, S, nH, C), sampling_locations (B, Q, nH, L, P, 2).
struct MsDeformAttnSizes {
  int64_t B, S, nH, C, Q, L, P;
};

// TORCH_CHECKs dtypes, devices, ranks, contiguity and agreeing sizes (nothing that reads tensor
// values, so it is cheap on any device) and returns the sizes.
MsDeformAttnSizes check_ms_deform_attn_args(const at::Tensor& value,
                                            const at::Tensor& spatial_shapes,
                                            const at::Tensor& level_start_index,
                                            const at::Tensor& sampling_locations,
                                            const at::Tensor& attention_weights,
                                            int64_t im2col_step);

// The same for the backward op, plus grad_output (B, Q, nH * C).
MsDeformAttnSizes check_ms_deform_attn_backward_args(const at::Tensor& grad_output,
                                                     const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     int64_t im2col_step);

}  // namespace panoray
