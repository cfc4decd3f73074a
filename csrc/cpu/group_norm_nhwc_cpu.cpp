// panoray::group_norm_nhwc / group_norm_nhwc_backward (CPU, float32 / float64): GroupNorm of a
// channels_last map, read and written in its own memory order.
//
// A channels_last (B, C, H, W) map is B blocks of HW rows of C contiguous channels; group g holds
// the D = C / G channels [g D, (g + 1) D). Both directions make two passes over a block: one that
// sums per channel (in double), one that applies a per-channel affine map. PyTorch's own CPU
// kernel for this layout is several times slower in the backward than for contiguous maps, and
// copying to contiguous and back costs more than the norm itself.
//
// Forward: y = x * scale_c + shift_c with scale_c = rstd_g * gamma_c and
// shift_c = beta_c - mean_g * scale_c. Backward, with xhat = (x - mean) * rstd and the group
// means m1 = mean(gamma dy), m2 = mean(gamma dy xhat) over the group's N = HW D values:
//   dx = rstd gamma_c dy - rstd m1 - rstd xhat m2 = a_c dy + b_g x + c_g,
//   a_c = rstd gamma_c, b_g = -rstd^2 m2, c_g = rstd^2 mean m2 - rstd m1;
//   dgamma_c = sum_b rstd (sum dy x - mean sum dy), dbeta_c = sum_b sum dy.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace panoray {
namespace {

struct Dims {
  int64_t B, C, HW, G, D;
};

Dims check_nhwc(const at::Tensor& x, int64_t groups, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": the input must be (B, C, H, W), got shape ", x.sizes(), ".");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              ": the input must be channels_last.");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              ": the input must be float32 or float64, got ", x.scalar_type(), ".");
  const int64_t C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, name, ": ", C, " channels do not split into ",
              groups, " groups.");
  return {x.size(0), C, x.size(2) * x.size(3), groups, C / groups};
}

// Per-channel sums over the HW rows of one block: sum[c] += x, and when `second` is given,
// second[c] += x * other (other = x for the forward's sum of squares).
template <typename scalar_t>
void channel_sums(const scalar_t* x, const scalar_t* other, int64_t HW, int64_t C, double* sum,
                  double* second) {
  for (int64_t r = 0; r < HW; ++r) {
    const scalar_t* xr = x + r * C;
    const scalar_t* orow = other + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += static_cast<double>(xr[c]);
      second[c] += static_cast<double>(xr[c]) * static_cast<double>(orow[c]);
    }
  }
}

// out = x * a_c + b_c (+ dy * k_c when dy is given) over the HW rows of one block.
template <typename scalar_t>
void channel_affine(const scalar_t* x, const scalar_t* dy, const scalar_t* k, const scalar_t* a,
                    const scalar_t* b, int64_t HW, int64_t C, scalar_t* out) {
  for (int64_t r = 0; r < HW; ++r) {
    const scalar_t* xr = x + r * C;
    scalar_t* o = out + r * C;
    if (dy == nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = xr[c] * a[c] + b[c];
    } else {
      const scalar_t* dr = dy + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = dr[c] * k[c] + xr[c] * a[c] + b[c];
    }
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  double eps, const Dims& d, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const scalar_t* bi = bias.const_data_ptr<scalar_t>();
  scalar_t* yd = y.mutable_data_ptr<scalar_t>();
  scalar_t* md = mean.mutable_data_ptr<scalar_t>();
  scalar_t* rd = rstd.mutable_data_ptr<scalar_t>();
  const double n = static_cast<double>(d.HW * d.D);
  at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(d.C), sq(d.C);
    std::vector<scalar_t> scale(d.C), shift(d.C);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t offset = b * d.HW * d.C;
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      channel_sums(xd + offset, xd + offset, d.HW, d.C, sum.data(), sq.data());
      for (int64_t g = 0; g < d.G; ++g) {
        double s = 0.0, q = 0.0;
        for (int64_t c = g * d.D; c < (g + 1) * d.D; ++c) {
          s += sum[c];
          q += sq[c];
        }
        const double mu = s / n;
        const double var = std::max(q / n - mu * mu, 0.0);
        const double r = 1.0 / std::sqrt(var + eps);
        md[b * d.G + g] = static_cast<scalar_t>(mu);
        rd[b * d.G + g] = static_cast<scalar_t>(r);
        for (int64_t c = g * d.D; c < (g + 1) * d.D; ++c) {
          scale[c] = static_cast<scalar_t>(r * static_cast<double>(w[c]));
          shift[c] = static_cast<scalar_t>(static_cast<double>(bi[c]) - mu * r * w[c]);
        }
      }
      channel_affine<scalar_t>(xd + offset, nullptr, nullptr, scale.data(), shift.data(), d.HW,
                               d.C, yd + offset);
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& weight, const Dims& d,
                   at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  const scalar_t* dyd = dy.const_data_ptr<scalar_t>();
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* md = mean.const_data_ptr<scalar_t>();
  const scalar_t* rd = rstd.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  scalar_t* dxd = dx.mutable_data_ptr<scalar_t>();
  const double n = static_cast<double>(d.HW * d.D);
  // per-image channel sums of dy and dy * x, kept for dweight / dbias
  std::vector<double> sum_dy(d.B * d.C, 0.0), sum_dyx(d.B * d.C, 0.0);
  at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> k(d.C), a(d.C), c0(d.C);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t offset = b * d.HW * d.C;
      double* sdy = sum_dy.data() + b * d.C;
      double* sdyx = sum_dyx.data() + b * d.C;
      channel_sums(dyd + offset, xd + offset, d.HW, d.C, sdy, sdyx);
      for (int64_t g = 0; g < d.G; ++g) {
        const double mu = md[b * d.G + g], r = rd[b * d.G + g];
        double m1 = 0.0, m2 = 0.0;  // sums of gamma dy and gamma dy (x - mean)
        for (int64_t c = g * d.D; c < (g + 1) * d.D; ++c) {
          m1 += w[c] * sdy[c];
          m2 += w[c] * (sdyx[c] - mu * sdy[c]);
        }
        m1 /= n;
        m2 = m2 * r / n;
        const double bg = -r * r * m2;
        const double cg = r * r * mu * m2 - r * m1;
        for (int64_t c = g * d.D; c < (g + 1) * d.D; ++c) {
          k[c] = static_cast<scalar_t>(r * w[c]);
          a[c] = static_cast<scalar_t>(bg);
          c0[c] = static_cast<scalar_t>(cg);
        }
      }
      channel_affine<scalar_t>(xd + offset, dyd + offset, k.data(), a.data(), c0.data(), d.HW,
                               d.C, dxd + offset);
    }
  });
  scalar_t* dw = dweight.mutable_data_ptr<scalar_t>();
  scalar_t* db = dbias.mutable_data_ptr<scalar_t>();
  for (int64_t c = 0; c < d.C; ++c) {
    double gw = 0.0, gb = 0.0;
    for (int64_t b = 0; b < d.B; ++b) {
      const int64_t g = c / d.D;
      const double mu = md[b * d.G + g], r = rd[b * d.G + g];
      gw += r * (sum_dyx[b * d.C + c] - mu * sum_dy[b * d.C + c]);
      gb += sum_dy[b * d.C + c];
    }
    dw[c] = static_cast<scalar_t>(gw);
    db[c] = static_cast<scalar_t>(gb);
  }
}

void check_affine(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.scalar_type() == x.scalar_type(),
              "group_norm_nhwc: ", what, " must be (C,) of the input's dtype.");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_nhwc_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
    double eps) {
  const Dims d = check_nhwc(x, groups, "group_norm_nhwc");
  check_affine(weight, x, "weight");
  check_affine(bias, x, "bias");
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({d.B, d.G}, x.options());
  at::Tensor rstd = at::empty({d.B, d.G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_nhwc", [&] {
    forward_impl<scalar_t>(x, weight.contiguous(), bias.contiguous(), eps, d, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_nhwc_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, int64_t groups) {
  const Dims d = check_nhwc(x, groups, "group_norm_nhwc_backward");
  check_affine(weight, x, "weight");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "group_norm_nhwc_backward: grad_y must match the input.");
  const at::Tensor dy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dweight = at::empty({d.C}, x.options());
  at::Tensor dbias = at::empty({d.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_nhwc_backward", [&] {
    backward_impl<scalar_t>(dy, x, mean.contiguous(), rstd.contiguous(), weight.contiguous(), d,
                            dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(panoray, CPU, m) {
  m.impl("group_norm_nhwc", &group_norm_nhwc_cpu);
  m.impl("group_norm_nhwc_backward", &group_norm_nhwc_backward_cpu);
}

}  // namespace panoray
