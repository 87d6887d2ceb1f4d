// The C++ CPU kernels of so8t_kernels, registered as torch.ops.so8t_cpp.* (register.cpp).
// Each one computes exactly what the PyTorch reference of its op computes (so8t_kernels/so8_exp.py,
// so8_rotate.py, logit_stats.py, linear_cross_entropy.py), in fp32 whatever the input dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace so8t {

constexpr int kBlockSize = 8;
constexpr int kNumParams = 28;  // pairs (i, j), i < j, row-major: (0,1), (0,2), …, (6,7)

// Copies of so8t_kernels/so8_exp.py's constants (tests/test_csrc.py checks that they agree):
// TAYLOR_DEGREE[torch.float32], SCALED_NORM_MAX and MAX_SQUARINGS.
constexpr int kTaylorDegree = 13;
constexpr float kScaledNormMax = 2.0f;
constexpr int kMaxSquarings = 64;

// Calls body(T{}) with T the C++ type of an fp32/bf16/fp16 dtype (the dtypes the ops accept).
template <typename Body>
void dispatch_float_types(at::ScalarType dtype, const char* op, const Body& body) {
  switch (dtype) {
    case at::kFloat:
      return body(float{});
    case at::kBFloat16:
      return body(c10::BFloat16{});
    case at::kHalf:
      return body(c10::Half{});
    default:
      TORCH_CHECK(false, op, ": dtype ", dtype, " is not one of float32, bfloat16, float16");
  }
}

// theta [..., 28] → R [..., 8, 8] fp32 and ‖RᵀR − I‖_F [...] fp32.
std::tuple<at::Tensor, at::Tensor> exp_forward(const at::Tensor& theta);
// dL/dR [..., 8, 8], theta [..., 28] → dL/dθ [..., 28] in theta's dtype.
at::Tensor exp_backward(const at::Tensor& grad_rotation, const at::Tensor& theta);

// y = M_b x_b per 8-wide chunk, M_b = (1 − σ(α))I + σ(α)R_b; stats = [Σ y², max |y|, non-finite count].
std::tuple<at::Tensor, at::Tensor> rotate_forward(
    const at::Tensor& x, const at::Tensor& rotation, const at::Tensor& alpha, bool with_stats);
// (dx, dR, dα) from dy; the parts not asked for are empty tensors of x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rotation, const at::Tensor& alpha,
    bool need_x, bool need_params);

// [mean, std, min, max, non-finite count] fp32 over the finite entries of logits.
at::Tensor logit_stats(const at::Tensor& logits);

// Chunked cross-entropy of hidden @ weightᵀ + bias (linear_cross_entropy.cpp): (loss, stats [7] or
// empty, dhidden, dweight, dbias), the gradients computed only when asked for (else empty tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& grad_scale, bool with_stats, bool need_hidden, bool need_weight, bool need_bias,
    int64_t chunk_size);

}  // namespace so8t
