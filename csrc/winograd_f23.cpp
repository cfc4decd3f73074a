// The panoray::winograd_f23_input / winograd_f23_output operators and their adjoints: the data
// transforms of a Winograd F(2x2, 3x3) convolution of a channels_last map (a CPU training
// helper, see model/cpu_training.py).
// CPU kernels: csrc/cpu/winograd_f23_cpu.cpp; fake kernels and autograd: model/cpu_ops.py.
#include <torch/library.h>

namespace panoray {

TORCH_LIBRARY_FRAGMENT(panoray, m) {
  m.def("winograd_f23_input(Tensor x) -> Tensor");
  m.def("winograd_f23_input_backward(Tensor grad_v, int[] size) -> Tensor");
  m.def("winograd_f23_output(Tensor m, int[] size) -> Tensor");
  m.def("winograd_f23_output_backward(Tensor grad_y) -> Tensor");
}

}  // namespace panoray
