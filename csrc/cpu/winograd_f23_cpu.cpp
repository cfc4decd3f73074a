// panoray::winograd_f23_input / _output and their adjoints (CPU, float32 / float64): the two
// data transforms of a Winograd F(2x2, 3x3) convolution (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2016) of a channels_last map, stride 1, padding 1.
//
// A 3x3 convolution of a (B, C, H, W) map is cut into T = B * ceil(H/2) * ceil(W/2) output
// tiles of 2x2 pixels; tile (ty, tx) reads the 4x4 input patch whose top-left pixel is
// (2 ty - 1, 2 tx - 1), zeros outside the map. With the 4x4 input transform B^T, the 4x3 filter
// transform G and the 2x4 output transform A^T,
//   y_tile = A^T [ (G g G^T) (.) (B^T d B) ] A,
// and the elementwise product summed over input channels is, for each of the 16 positions of
// the 4x4 transformed tile, one matrix product (T x C) @ (C x C_out). The matrix products and the
// filter transform run as PyTorch ops (model/cpu_training.py), so autograd differentiates them;
// these kernels are the data transforms, each with its adjoint (the transposed linear map),
// which is its backward:
//   input:   x (B, C, H, W) channels_last -> V (16, T, C),  V[4k+l] = (B^T d B)[k][l]
//   output:  M (16, T, C_out) -> y (B, C_out, H, W) channels_last,  y_tile = A^T M A
// 2.25x fewer multiplications than the direct convolution; the transforms only add and subtract.
//
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]    A^T = [1 1 1 0; 0 1 -1 -1]
//
// Every loop runs over the contiguous channels of one pixel, so it vectorises; a pixel outside
// the map is a row of zeros (read as zeros, or written and thrown away).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "x86_dispatch.h"

namespace panoray {
namespace {

struct Tiles {
  int64_t B, C, H, W, th, tw;
  int64_t T() const { return B * th * tw; }
};

Tiles tiles_of(c10::IntArrayRef size, const char* name) {
  TORCH_CHECK(size.size() == 4, name, ": the map size must be (B, C, H, W), got ", size, ".");
  TORCH_CHECK(size[0] > 0 && size[1] > 0 && size[2] > 0 && size[3] > 0, name,
              ": the map must not be empty, got ", size, ".");
  return {size[0], size[1], size[2], size[3], (size[2] + 1) / 2, (size[3] + 1) / 2};
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected float32 or float64, got ", t.scalar_type(), ".");
}

// ---------------------------------------------------------------------------- tile arithmetic
// d[4i + j]: the input pixel at row i, column j of the patch; v[4k + l]: transformed position.

template <typename scalar_t>
PANORAY_ALWAYS_INLINE void input_tile(const scalar_t* const* d, scalar_t* const* v, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    scalar_t t[4][4];  // t = B^T d
    for (int j = 0; j < 4; ++j) {
      const scalar_t d0 = d[j][c], d1 = d[4 + j][c], d2 = d[8 + j][c], d3 = d[12 + j][c];
      t[0][j] = d0 - d2;
      t[1][j] = d1 + d2;
      t[2][j] = d2 - d1;
      t[3][j] = d1 - d3;
    }
    for (int k = 0; k < 4; ++k) {  // v = t B
      v[4 * k + 0][c] = t[k][0] - t[k][2];
      v[4 * k + 1][c] = t[k][1] + t[k][2];
      v[4 * k + 2][c] = t[k][2] - t[k][1];
      v[4 * k + 3][c] = t[k][1] - t[k][3];
    }
  }
}

// The adjoint: gd = B gv B^T, added into the patch's pixels.
template <typename scalar_t>
PANORAY_ALWAYS_INLINE void input_tile_adjoint(const scalar_t* const* g, scalar_t* const* gd,
                                              int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    scalar_t u[4][4];  // u = B g
    for (int l = 0; l < 4; ++l) {
      const scalar_t g0 = g[l][c], g1 = g[4 + l][c], g2 = g[8 + l][c], g3 = g[12 + l][c];
      u[0][l] = g0;
      u[1][l] = g1 - g2 + g3;
      u[2][l] = g1 + g2 - g0;
      u[3][l] = -g3;
    }
    for (int i = 0; i < 4; ++i) {  // gd = u B^T
      gd[4 * i + 0][c] += u[i][0];
      gd[4 * i + 1][c] += u[i][1] - u[i][2] + u[i][3];
      gd[4 * i + 2][c] += u[i][1] + u[i][2] - u[i][0];
      gd[4 * i + 3][c] -= u[i][3];
    }
  }
}

// m[4k + l] -> y[2a + b] = (A^T m A)[a][b].
template <typename scalar_t>
PANORAY_ALWAYS_INLINE void output_tile(const scalar_t* const* m, scalar_t* const* y, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    scalar_t s[2][4];  // s = A^T m
    for (int l = 0; l < 4; ++l) {
      const scalar_t m0 = m[l][c], m1 = m[4 + l][c], m2 = m[8 + l][c], m3 = m[12 + l][c];
      s[0][l] = m0 + m1 + m2;
      s[1][l] = m1 - m2 - m3;
    }
    for (int a = 0; a < 2; ++a) {
      y[2 * a + 0][c] = s[a][0] + s[a][1] + s[a][2];
      y[2 * a + 1][c] = s[a][1] - s[a][2] - s[a][3];
    }
  }
}

// The adjoint: gm = A gy A^T.
template <typename scalar_t>
PANORAY_ALWAYS_INLINE void output_tile_adjoint(const scalar_t* const* gy, scalar_t* const* gm,
                                               int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    scalar_t w[4][2];  // w = A gy
    for (int b = 0; b < 2; ++b) {
      const scalar_t y0 = gy[b][c], y1 = gy[2 + b][c];
      w[0][b] = y0;
      w[1][b] = y0 + y1;
      w[2][b] = y0 - y1;
      w[3][b] = -y1;
    }
    for (int k = 0; k < 4; ++k) {
      gm[4 * k + 0][c] = w[k][0];
      gm[4 * k + 1][c] = w[k][0] + w[k][1];
      gm[4 * k + 2][c] = w[k][0] - w[k][1];
      gm[4 * k + 3][c] = -w[k][1];
    }
  }
}

// Each tile function is built twice, plainly and for AVX2 + FMA; use_avx2() picks at run time.
#define PANORAY_TILE_VARIANTS(fn, in_t, out_t)                                               \
  template <typename scalar_t>                                                               \
  void fn##_base(in_t a, out_t b, int64_t C) { fn<scalar_t>(a, b, C); }                      \
  PANORAY_AVX2_VARIANT(fn, in_t, out_t)                                                      \
  template <typename scalar_t>                                                               \
  void fn##_any(in_t a, out_t b, int64_t C) {                                                \
    PANORAY_AVX2_CALL(fn)                                                                    \
    fn##_base<scalar_t>(a, b, C);                                                            \
  }

#if PANORAY_X86_DISPATCH
#define PANORAY_AVX2_VARIANT(fn, in_t, out_t) \
  template <typename scalar_t>                \
  PANORAY_TARGET_AVX2 void fn##_avx2(in_t a, out_t b, int64_t C) { fn<scalar_t>(a, b, C); }
#define PANORAY_AVX2_CALL(fn) \
  if (use_avx2()) return fn##_avx2<scalar_t>(a, b, C);
#else
#define PANORAY_AVX2_VARIANT(fn, in_t, out_t)
#define PANORAY_AVX2_CALL(fn)
#endif

#define PANORAY_IN const scalar_t* const*
#define PANORAY_OUT scalar_t* const*
PANORAY_TILE_VARIANTS(input_tile, PANORAY_IN, PANORAY_OUT)
PANORAY_TILE_VARIANTS(input_tile_adjoint, PANORAY_IN, PANORAY_OUT)
PANORAY_TILE_VARIANTS(output_tile, PANORAY_IN, PANORAY_OUT)
PANORAY_TILE_VARIANTS(output_tile_adjoint, PANORAY_IN, PANORAY_OUT)
#undef PANORAY_IN
#undef PANORAY_OUT

// ------------------------------------------------------------------------------------ drivers

// The pixel rows y0 .. y0 + n - 1 of image b (nullptr where outside the map).
template <typename T>
void row_pointers(T* map, const Tiles& s, int64_t b, int64_t y0, int n, T** rows) {
  for (int i = 0; i < n; ++i) {
    const int64_t y = y0 + i;
    rows[i] = (y >= 0 && y < s.H) ? map + (b * s.H + y) * s.W * s.C : nullptr;
  }
}

// Pointers to the n x n pixels from column x0 of the given rows; `outside` where off the map.
template <typename T>
void pixel_pointers(T* const* rows, const Tiles& s, int64_t x0, int n, T* outside, T** px) {
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      const int64_t x = x0 + j;
      px[n * i + j] = (rows[i] != nullptr && x >= 0 && x < s.W) ? rows[i] + x * s.C : outside;
    }
  }
}

// Pointers to the 16 transformed rows of tile t in a (16, T, C) tensor.
template <typename T>
void transformed_pointers(T* base, const Tiles& s, int64_t t, int64_t C, T** out) {
  for (int e = 0; e < 16; ++e) out[e] = base + (e * s.T() + t) * C;
}

// Calls tile(pixels, transformed) for tile rows first, first + step, ... of every image (rows
// split among threads) and every tile along them: `pixels` are the n x n pixel pointers of the
// tile's patch (n = 4: the input patch from (2 ty - 1, 2 tx - 1); n = 2: the output tile from
// (2 ty, 2 tx)), pointing at a per-thread row of zeros where off the map (read as zeros, or
// written and thrown away), `transformed` its 16 rows of the (16, T, C) tensor.
template <typename P, typename Q, typename Fn>
void for_each_tile(P* map, Q* transformed, const Tiles& s, int n, int64_t first, int64_t step,
                   const Fn& tile) {
  using scalar_t = std::remove_const_t<P>;
  const int64_t rows_per_image = (s.th - first + step - 1) / step;
  const int64_t offset = n == 4 ? -1 : 0;
  at::parallel_for(0, s.B * rows_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> outside(s.C, scalar_t(0));
    P* rows[4];
    P* pixels[16];
    Q* out[16];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / rows_per_image, ty = first + step * (r % rows_per_image);
      row_pointers(map, s, b, 2 * ty + offset, n, rows);
      for (int64_t tx = 0; tx < s.tw; ++tx) {
        pixel_pointers<P>(rows, s, 2 * tx + offset, n, outside.data(), pixels);
        transformed_pointers(transformed, s, (b * s.th + ty) * s.tw + tx, s.C, out);
        tile(pixels, out);
      }
    }
  });
}

template <typename scalar_t>
void input_impl(const scalar_t* x, const Tiles& s, scalar_t* v) {
  for_each_tile(x, v, s, 4, 0, 1, [&](const scalar_t* const* d, scalar_t* const* out) {
    input_tile_any<scalar_t>(d, out, s.C);
  });
}

// Patches of neighbouring tiles overlap, so the scatter runs in two passes over tile rows of
// one parity (rows 2 ty - 1 .. 2 ty + 2 of even ty never meet) and along a row in order.
template <typename scalar_t>
void input_adjoint_impl(const scalar_t* gv, const Tiles& s, scalar_t* gx) {
  for (int64_t parity = 0; parity < 2; ++parity) {
    for_each_tile(gx, gv, s, 4, parity, 2, [&](scalar_t* const* d, const scalar_t* const* g) {
      input_tile_adjoint_any<scalar_t>(g, d, s.C);
    });
  }
}

template <typename scalar_t>
void output_impl(const scalar_t* m, const Tiles& s, scalar_t* y) {
  for_each_tile(y, m, s, 2, 0, 1, [&](scalar_t* const* px, const scalar_t* const* in) {
    output_tile_any<scalar_t>(in, px, s.C);
  });
}

template <typename scalar_t>
void output_adjoint_impl(const scalar_t* gy, const Tiles& s, scalar_t* gm) {
  for_each_tile(gy, gm, s, 2, 0, 1, [&](const scalar_t* const* px, scalar_t* const* out) {
    output_tile_adjoint_any<scalar_t>(px, out, s.C);
  });
}

// ------------------------------------------------------------------------------------- ops

void check_map(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": the map must be (B, C, H, W), got shape ", x.sizes(), ".");
  check_float(x, name);
}

void check_transformed(const at::Tensor& v, const Tiles& s, int64_t C, const char* name) {
  TORCH_CHECK(v.dim() == 3 && v.size(0) == 16 && v.size(1) == s.T() && v.size(2) == C, name,
              ": expected the transformed tiles as (16, ", s.T(), ", ", C, "), got ", v.sizes(),
              ".");
  check_float(v, name);
}

// A (B, C, H, W) map -> its (16, T, C) tiles by fn(map, tiles, out).
template <typename Fn>
at::Tensor map_to_tiles(const at::Tensor& x, const char* name, const Fn& fn) {
  check_map(x, name);
  const Tiles s = tiles_of(x.sizes(), name);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor v = at::empty({16, s.T(), s.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_f23", [&] {
    fn(xc.const_data_ptr<scalar_t>(), s, v.mutable_data_ptr<scalar_t>());
  });
  return v;
}

// (16, T, C) tiles -> a channels_last map of `size` by fn(tiles, map, out); `accumulate`: fn
// adds into a cleared map instead of writing every pixel.
template <typename Fn>
at::Tensor tiles_to_map(const at::Tensor& v, c10::IntArrayRef size, bool accumulate,
                        const char* name, const Fn& fn) {
  const Tiles s = tiles_of(size, name);
  check_transformed(v, s, s.C, name);
  const at::Tensor vc = v.contiguous();
  at::Tensor y = at::empty(size, v.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (accumulate) y.zero_();  // (at::zeros takes no memory format)
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "winograd_f23", [&] {
    fn(vc.const_data_ptr<scalar_t>(), s, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor winograd_f23_input_cpu(const at::Tensor& x) {
  return map_to_tiles(x, "winograd_f23_input",
                      [](const auto* in, const Tiles& s, auto* out) { input_impl(in, s, out); });
}

at::Tensor winograd_f23_input_backward_cpu(const at::Tensor& grad_v, c10::IntArrayRef size) {
  return tiles_to_map(
      grad_v, size, true, "winograd_f23_input_backward",
      [](const auto* in, const Tiles& s, auto* out) { input_adjoint_impl(in, s, out); });
}

at::Tensor winograd_f23_output_cpu(const at::Tensor& m, c10::IntArrayRef size) {
  return tiles_to_map(m, size, false, "winograd_f23_output",
                      [](const auto* in, const Tiles& s, auto* out) { output_impl(in, s, out); });
}

at::Tensor winograd_f23_output_backward_cpu(const at::Tensor& grad_y) {
  return map_to_tiles(
      grad_y, "winograd_f23_output_backward",
      [](const auto* in, const Tiles& s, auto* out) { output_adjoint_impl(in, s, out); });
}

}  // namespace

TORCH_LIBRARY_IMPL(panoray, CPU, m) {
  m.impl("winograd_f23_input", &winograd_f23_input_cpu);
  m.impl("winograd_f23_input_backward", &winograd_f23_input_backward_cpu);
  m.impl("winograd_f23_output", &winograd_f23_output_cpu);
  m.impl("winograd_f23_output_backward", &winograd_f23_output_backward_cpu);
}

}  // namespace panoray
