// torch.ops.so8t_cpp.* (CPU kernels) and the Python module so8t_kernels._C that registers them on import.
#include <Python.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include "simd.h"
#include "so8t.h"

TORCH_LIBRARY(so8t_cpp, m) {
  m.def("exp_forward(Tensor theta) -> (Tensor, Tensor)");
  m.def("exp_backward(Tensor grad_rotation, Tensor theta) -> Tensor");
  m.def("rotate_forward(Tensor x, Tensor rotation, Tensor alpha, bool with_stats) -> (Tensor, Tensor)");
  m.def(
      "rotate_backward(Tensor grad_y, Tensor x, Tensor rotation, Tensor alpha, bool need_x, bool need_params)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("logit_stats(Tensor logits) -> Tensor");
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
      " str reduction, Tensor? grad_scale, bool with_stats, bool need_hidden, bool need_weight, bool need_bias,"
      " int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(so8t_cpp, CPU, m) {
  m.impl("exp_forward", &so8t::exp_forward);
  m.impl("exp_backward", &so8t::exp_backward);
  m.impl("rotate_forward", &so8t::rotate_forward);
  m.impl("rotate_backward", &so8t::rotate_backward);
  m.impl("logit_stats", &so8t::logit_stats);
  m.impl("linear_cross_entropy", &so8t::linear_cross_entropy);
}

namespace {

#define SO8T_STRINGIFY_(value) #value
#define SO8T_STRINGIFY(value) SO8T_STRINGIFY_(value)

// Which target_clones variant the loader picked for this CPU (simd.h).
const char* kernel_variant() {
#if SO8T_HAS_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
  return "x86-64 (SSE2)";
#else
  return "baseline (no per-CPU variants with this compiler)";
#endif
}

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "so8t C++ CPU kernels (torch.ops.so8t_cpp)", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // so8t_kernels/_cpp.py refuses an extension built against another torch release.
  const char* torch_version = SO8T_STRINGIFY(TORCH_VERSION_MAJOR) "." SO8T_STRINGIFY(
      TORCH_VERSION_MINOR) "." SO8T_STRINGIFY(TORCH_VERSION_PATCH);
  if (PyModule_AddStringConstant(module, "TORCH_VERSION", torch_version) < 0 ||
      PyModule_AddStringConstant(module, "KERNEL_VARIANT", kernel_variant()) < 0 ||
      PyModule_AddIntConstant(module, "TAYLOR_DEGREE", so8t::kTaylorDegree) < 0 ||
      PyModule_AddObject(module, "SCALED_NORM_MAX", PyFloat_FromDouble(so8t::kScaledNormMax)) < 0 ||
      PyModule_AddIntConstant(module, "MAX_SQUARINGS", so8t::kMaxSquarings) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
