// The panoray::ms_deform_attn operator: schema, argument checks shared by the backends, and the
// empty Python module whose import (`import model._C`) loads this library and so registers the
// op. Kernels: csrc/cpu/ms_deform_attn_cpu.cpp and csrc/cuda/ms_deform_attn_cuda.cu.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

extern "C" {
// `import model._C` needs a module init; the module itself is empty (no pybind): the operators
// are registered by the static TORCH_LIBRARY initialisers when the library is loaded.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // docstring
      -1,    // per-interpreter state size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace panoray {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& value) {
  TORCH_CHECK(t.dim() == dim, "ms_deform_attn: ", name, " must have ", dim, " dimensions, got ",
              t.sizes(), ".");
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(),
              " but value is on ", value.device(), "; move all inputs to one device.");
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name,
              " must be contiguous; call .contiguous() on it.");
}

}  // namespace

MsDeformAttnSizes check_ms_deform_attn_args(const at::Tensor& value,
                                            const at::Tensor& spatial_shapes,
                                            const at::Tensor& level_start_index,
                                            const at::Tensor& sampling_locations,
                                            const at::Tensor& attention_weights,
                                            int64_t im2col_step) {
  TORCH_CHECK(is_float_type(value.scalar_type()),
              "ms_deform_attn: value must be float16, bfloat16, float32 or float64, got ",
              value.scalar_type(), ".");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), " and ",
              attention_weights.scalar_type(), ".");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type(), ".");
  TORCH_CHECK(im2col_step > 0, "ms_deform_attn: im2col_step must be positive, got ", im2col_step,
              ".");
  check_tensor(value, "value", 4, value);
  check_tensor(spatial_shapes, "spatial_shapes", 2, value);
  check_tensor(level_start_index, "level_start_index", 1, value);
  check_tensor(sampling_locations, "sampling_locations", 6, value);
  check_tensor(attention_weights, "attention_weights", 5, value);

  MsDeformAttnSizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                      sampling_locations.size(1), spatial_shapes.size(0),
                      sampling_locations.size(4)};
  TORCH_CHECK(spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) rows of (h, w), got ",
              spatial_shapes.sizes(), ".");
  TORCH_CHECK(level_start_index.size(0) == s.L, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " entries but spatial_shapes has ", s.L, " levels.");
  const std::vector<int64_t> loc_sizes{s.B, s.Q, s.nH, s.L, s.P, 2};
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(loc_sizes),
              "ms_deform_attn: sampling_locations has shape ", sampling_locations.sizes(),
              " but value and spatial_shapes need ", at::IntArrayRef(loc_sizes), ".");
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(loc_sizes).slice(0, 5),
              "ms_deform_attn: attention_weights has shape ", attention_weights.sizes(),
              " but sampling_locations needs ", at::IntArrayRef(loc_sizes).slice(0, 5), ".");
  return s;
}

MsDeformAttnSizes check_ms_deform_attn_backward_args(const at::Tensor& grad_output,
                                                     const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     int64_t im2col_step) {
  const MsDeformAttnSizes s = check_ms_deform_attn_args(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step);
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn_backward: grad_output must have value's dtype ",
              value.scalar_type(), ", got ", grad_output.scalar_type(), ".");
  check_tensor(grad_output, "grad_output", 3, value);
  const std::vector<int64_t> out_sizes{s.B, s.Q, s.nH * s.C};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_sizes),
              "ms_deform_attn_backward: grad_output has shape ", grad_output.sizes(),
              ", expected ", at::IntArrayRef(out_sizes), ".");
  return s;
}

TORCH_LIBRARY(panoray, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "int im2col_step) -> (Tensor, Tensor, Tensor)");
}

}  // namespace panoray
