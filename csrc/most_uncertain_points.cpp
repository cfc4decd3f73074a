// The panoray::most_uncertain_points operator: the importance-sampling step of the Mask2Former
// loss in one pass per mask (a CPU training helper, see model/cpu_training.py).
// CPU kernel: csrc/cpu/most_uncertain_points_cpu.cpp; fake kernel: model/cpu_ops.py.
#include <torch/library.h>

namespace panoray {

TORCH_LIBRARY_FRAGMENT(panoray, m) {
  m.def("most_uncertain_points(Tensor logits, Tensor candidates, int k) -> Tensor");
}

}  // namespace panoray
