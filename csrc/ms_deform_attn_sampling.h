// Bilinear sampling arithmetic of multi-scale deformable attention, shared by the CPU kernel
// (csrc/cpu/) and the CUDA kernel (csrc/cuda/), so that the CPU tests exercise the arithmetic the
// GPU runs. Semantics: F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False), i.e. a normalised location `loc` in [0, 1] maps to the pixel coordinate
// `loc * size - 0.5`, and corners outside the map read as zero.
//
// A sampling point is handled in three steps, by both kernels:
//   1. `bilinear_point` turns (loc_x, loc_y) into up to four corners with offsets and weights;
//   2. forward: `bilinear_accumulate` adds the attention-weighted sample of one channel;
//      backward: each corner receives `corner_weight * grad` and the point's gradients follow
//      from the four per-corner dot products <grad_out, value_corner> via `bilinear_point_grads`
//      (linear in the dots, so a kernel may sum over channels before or after calling it).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PANORAY_HOST_DEVICE __host__ __device__
#else
#define PANORAY_HOST_DEVICE
#endif

namespace panoray {

PANORAY_HOST_DEVICE inline float floor_value(float v) { return floorf(v); }
PANORAY_HOST_DEVICE inline double floor_value(double v) { return ::floor(v); }

// One sampling point on one level. Corner order: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename acc_t>
struct BilinearPoint {
  int64_t offset[4];  // corner's pixel index inside the level (y * w + x); 0 where invalid
  acc_t weight[4];    // bilinear weight of the corner; 0 where invalid
  bool valid[4];      // whether the corner lies inside the map
  acc_t lx, ly;       // fractional parts of the pixel coordinate
};

// Fills `p` for the normalised location (loc_x, loc_y) on an h x w map. Returns false when no
// corner lies inside the map (the sample and all gradients are zero); NaN locations also return
// false, and huge ones never reach the integer conversion.
template <typename acc_t>
PANORAY_HOST_DEVICE inline bool bilinear_point(acc_t loc_x, acc_t loc_y, int64_t h, int64_t w,
                                               BilinearPoint<acc_t>& p) {
  const acc_t x = loc_x * static_cast<acc_t>(w) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(h) - static_cast<acc_t>(0.5);
  // x == -1 still has the corner x0 + 1 == 0 inside (with weight 0 but a non-zero gradient).
  if (!(x >= static_cast<acc_t>(-1) && x < static_cast<acc_t>(w) &&
        y >= static_cast<acc_t>(-1) && y < static_cast<acc_t>(h))) {
    return false;
  }
  const acc_t fx = floor_value(x);
  const acc_t fy = floor_value(y);
  const int64_t x0 = static_cast<int64_t>(fx);
  const int64_t y0 = static_cast<int64_t>(fy);
  const int64_t x1 = x0 + 1;
  const int64_t y1 = y0 + 1;
  p.lx = x - fx;
  p.ly = y - fy;
  const acc_t hx = static_cast<acc_t>(1) - p.lx;
  const acc_t hy = static_cast<acc_t>(1) - p.ly;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x1 < w;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y1 < h;
  p.valid[0] = y0_in && x0_in;
  p.valid[1] = y0_in && x1_in;
  p.valid[2] = y1_in && x0_in;
  p.valid[3] = y1_in && x1_in;
  p.offset[0] = p.valid[0] ? y0 * w + x0 : 0;
  p.offset[1] = p.valid[1] ? y0 * w + x1 : 0;
  p.offset[2] = p.valid[2] ? y1 * w + x0 : 0;
  p.offset[3] = p.valid[3] ? y1 * w + x1 : 0;
  p.weight[0] = p.valid[0] ? hy * hx : static_cast<acc_t>(0);
  p.weight[1] = p.valid[1] ? hy * p.lx : static_cast<acc_t>(0);
  p.weight[2] = p.valid[2] ? p.ly * hx : static_cast<acc_t>(0);
  p.weight[3] = p.valid[3] ? p.ly * p.lx : static_cast<acc_t>(0);
  return true;
}

// The corner weights times the point's attention weight: what each corner's value is multiplied
// by in the forward pass, and what the output gradient is multiplied by for grad_value.
template <typename acc_t>
PANORAY_HOST_DEVICE inline void attention_scaled_weights(const BilinearPoint<acc_t>& p,
                                                         acc_t attention, acc_t (&out)[4]) {
  out[0] = p.weight[0] * attention;
  out[1] = p.weight[1] * attention;
  out[2] = p.weight[2] * attention;
  out[3] = p.weight[3] * attention;
}

// Forward, one channel: acc + sum_i scaled[i] * v_i (v_i is 0 for an invalid corner). The
// sample is summed before it is added, so that consecutive points' samples do not wait on acc.
template <typename acc_t>
PANORAY_HOST_DEVICE inline acc_t bilinear_accumulate(acc_t acc, const acc_t (&scaled)[4], acc_t v0,
                                                     acc_t v1, acc_t v2, acc_t v3) {
  return acc + (scaled[0] * v0 + scaled[1] * v1 + scaled[2] * v2 + scaled[3] * v3);
}

// Backward of one point from the dot products dot[i] = <grad_out, value at corner i> (0 for an
// invalid corner), over one channel or summed over channels.
//   grad_attention = sum_i weight[i] * dot[i]
//   grad_loc_x = attention * w * d(sample)/dx, grad_loc_y = attention * h * d(sample)/dy
template <typename acc_t>
PANORAY_HOST_DEVICE inline void bilinear_point_grads(const BilinearPoint<acc_t>& p,
                                                     const acc_t (&dot)[4], acc_t attention,
                                                     int64_t h, int64_t w, acc_t& grad_attention,
                                                     acc_t& grad_loc_x, acc_t& grad_loc_y) {
  const acc_t hx = static_cast<acc_t>(1) - p.lx;
  const acc_t hy = static_cast<acc_t>(1) - p.ly;
  grad_attention =
      p.weight[0] * dot[0] + p.weight[1] * dot[1] + p.weight[2] * dot[2] + p.weight[3] * dot[3];
  const acc_t d_dx = hy * (dot[1] - dot[0]) + p.ly * (dot[3] - dot[2]);
  const acc_t d_dy = hx * (dot[2] - dot[0]) + p.lx * (dot[3] - dot[1]);
  grad_loc_x = attention * static_cast<acc_t>(w) * d_dx;
  grad_loc_y = attention * static_cast<acc_t>(h) * d_dy;
}

}  // namespace panoray
