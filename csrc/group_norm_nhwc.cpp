// The panoray::group_norm_nhwc operator and its backward: GroupNorm of a channels_last map, read
// and written in its own memory order (a CPU training helper, see model/cpu_training.py).
// CPU kernels: csrc/cpu/group_norm_nhwc_cpu.cpp; fake kernels and autograd: model/cpu_ops.py.
#include <torch/library.h>

namespace panoray {

TORCH_LIBRARY_FRAGMENT(panoray, m) {
  m.def("group_norm_nhwc(Tensor x, Tensor weight, Tensor bias, int groups, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("group_norm_nhwc_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, "
        "Tensor weight, int groups) -> (Tensor, Tensor, Tensor)");
}

}  // namespace panoray
