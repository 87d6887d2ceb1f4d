// R = exp(A(θ)) for SO(8) blocks by scaling and squaring around a degree-13 Horner Taylor core, and
// its adjoint Fréchet derivative for the backward: the algorithm of exp_reference and
// exp_backward_reference in so8t_kernels/so8_exp.py, one matrix at a time in 8 vector registers.
//
// Cost per matrix: 12 + s 8×8 products forward (s = squarings, 0 for ‖A‖_F ≤ 2), 3 per Horner step
// and 3 per squaring backward; one product is 64 8-wide FMAs.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "simd.h"
#include "so8t.h"

namespace so8t {
namespace {

struct PairTable {
  int row[kNumParams];
  int col[kNumParams];
};

constexpr PairTable make_pair_table() {
  PairTable table{};
  int pair = 0;
  for (int i = 0; i < kBlockSize; ++i) {
    for (int j = i + 1; j < kBlockSize; ++j) {
      table.row[pair] = i;
      table.col[pair] = j;
      ++pair;
    }
  }
  return table;
}

constexpr PairTable kPairs = make_pair_table();

// ~2 µs of work per matrix forward, ~6 µs backward: 64 matrices amortize a thread hand-off.
constexpr int64_t kMatricesPerTask = 64;

SO8T_INLINE Mat8 identity() {
  Mat8 eye;
  for (int i = 0; i < 8; ++i) {
    eye.row[i] = splat(0.0f);
    eye.row[i][i] = 1.0f;
  }
  return eye;
}

SO8T_INLINE Mat8 skew_from_theta(const float* theta) {
  Mat8 skew;
  for (int i = 0; i < 8; ++i) skew.row[i] = splat(0.0f);
  for (int pair = 0; pair < kNumParams; ++pair) {
    skew.row[kPairs.row[pair]][kPairs.col[pair]] = theta[pair];
    skew.row[kPairs.col[pair]][kPairs.row[pair]] = -theta[pair];
  }
  return skew;
}

SO8T_INLINE float frobenius_norm(const Mat8& m) {
  f32x8 squares = m.row[0] * m.row[0];
  for (int i = 1; i < 8; ++i) squares += m.row[i] * m.row[i];
  return std::sqrt(horizontal_sum(squares));
}

// s ≥ 0 with ‖A‖_F / 2^s ≤ SCALED_NORM_MAX, at most MAX_SQUARINGS (inf A), 0 for NaN A, like squaring_count.
SO8T_INLINE int squaring_count(float norm) {
  const float count = std::ceil(std::log2(norm / kScaledNormMax));
  if (std::isnan(count)) return 0;
  return static_cast<int>(std::fmin(std::fmax(count, 0.0f), static_cast<float>(kMaxSquarings)));
}

SO8T_INLINE Mat8 scaled(const Mat8& m, float factor) {
  Mat8 out;
  for (int i = 0; i < 8; ++i) out.row[i] = m.row[i] * factor;
  return out;
}

// I + M / k, with 1/k folded into a multiply (the reference divides: ≤ 1 ulp apart).
SO8T_INLINE Mat8 identity_plus_scaled(const Mat8& m, float factor) {
  const Mat8 eye = identity();
  Mat8 out;
  for (int i = 0; i < 8; ++i) out.row[i] = eye.row[i] + m.row[i] * factor;
  return out;
}

SO8T_INLINE float orthogonality_residual(const Mat8& r) {
  // Row i of RᵀR is Σ_k R[k][i] row_k(R).
  const Mat8 eye = identity();
  f32x8 squares = splat(0.0f);
  for (int i = 0; i < 8; ++i) {
    f32x8 gram = r.row[0][i] * r.row[0];
    for (int k = 1; k < 8; ++k) gram += r.row[k][i] * r.row[k];
    const f32x8 deviation = gram - eye.row[i];
    squares += deviation * deviation;
  }
  return std::sqrt(horizontal_sum(squares));
}

SO8T_MULTIVERSION void exp_forward_range(
    const float* theta, float* rotation, float* residual, int64_t begin, int64_t end) {
  for (int64_t matrix = begin; matrix < end; ++matrix) {
    const Mat8 skew = skew_from_theta(theta + matrix * kNumParams);
    const int squarings = squaring_count(frobenius_norm(skew));
    const Mat8 x = scaled(skew, std::ldexp(1.0f, -squarings));
    Mat8 r = identity_plus_scaled(x, 1.0f / kTaylorDegree);
    for (int k = kTaylorDegree - 1; k >= 1; --k) r = identity_plus_scaled(matmul(x, r), 1.0f / k);
    for (int step = 0; step < squarings; ++step) r = matmul(r, r);
    store_mat8(rotation + matrix * 64, r);
    residual[matrix] = orthogonality_residual(r);
  }
}

// L(Aᵀ, G) forward-mode through the same Horner and squaring steps (Al-Mohy & Higham 2009).
SO8T_MULTIVERSION void exp_backward_range(
    const float* theta, const float* grad_rotation, float* grad_theta, int64_t begin, int64_t end) {
  for (int64_t matrix = begin; matrix < end; ++matrix) {
    const Mat8 skew = skew_from_theta(theta + matrix * kNumParams);
    const int squarings = squaring_count(frobenius_norm(skew));
    const float scale = std::ldexp(1.0f, -squarings);
    const Mat8 x = scaled(skew, -scale);  // Aᵀ = −A
    const Mat8 direction = scaled(load_mat8(grad_rotation + matrix * 64), scale);
    // Horner: H_k = I + X H_{k+1} / k, so dH_k = (E H_{k+1} + X dH_{k+1}) / k.
    Mat8 power = identity_plus_scaled(x, 1.0f / kTaylorDegree);
    Mat8 frechet = scaled(direction, 1.0f / kTaylorDegree);
    for (int k = kTaylorDegree - 1; k >= 1; --k) {
      frechet = scaled(matmul_add(direction, power, x, frechet), 1.0f / k);
      power = identity_plus_scaled(matmul(x, power), 1.0f / k);
    }
    // exp(2X) = exp(X)² ⇒ L(2X, 2E) = L(X, E) exp(X) + exp(X) L(X, E); the last power is unused.
    for (int step = 0; step < squarings; ++step) {
      frechet = matmul_add(frechet, power, power, frechet);
      if (step + 1 < squarings) power = matmul(power, power);
    }
    float* out = grad_theta + matrix * kNumParams;
    for (int pair = 0; pair < kNumParams; ++pair) {
      const int i = kPairs.row[pair];
      const int j = kPairs.col[pair];
      out[pair] = frechet.row[i][j] - frechet.row[j][i];
    }
  }
}

void check_theta(const at::Tensor& theta) {
  TORCH_CHECK(theta.device().is_cpu(), "so8t_cpp: theta must be a CPU tensor, got ", theta.device());
  TORCH_CHECK(
      theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kBFloat16 || theta.scalar_type() == at::kHalf,
      "so8t_cpp: theta has dtype ", theta.scalar_type(), "; expected float32, bfloat16 or float16");
  TORCH_CHECK(
      theta.dim() >= 1 && theta.size(-1) == kNumParams, "so8t_cpp: theta has shape ", theta.sizes(),
      "; expected [..., 28]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> exp_forward(const at::Tensor& theta) {
  check_theta(theta);
  const at::Tensor flat = theta.reshape({-1, kNumParams}).to(at::kFloat).contiguous();
  const int64_t count = flat.size(0);
  std::vector<int64_t> shape(theta.sizes().begin(), theta.sizes().end() - 1);
  const std::vector<int64_t> batch = shape;
  shape.insert(shape.end(), {kBlockSize, kBlockSize});
  at::Tensor rotation = at::empty(shape, flat.options());
  at::Tensor residual = at::empty(batch, flat.options());
  const float* theta_data = flat.const_data_ptr<float>();
  float* rotation_data = rotation.mutable_data_ptr<float>();
  float* residual_data = residual.mutable_data_ptr<float>();
  at::parallel_for(0, count, kMatricesPerTask, [&](int64_t begin, int64_t end) {
    exp_forward_range(theta_data, rotation_data, residual_data, begin, end);
  });
  return {rotation, residual};
}

at::Tensor exp_backward(const at::Tensor& grad_rotation, const at::Tensor& theta) {
  check_theta(theta);
  const at::Tensor flat = theta.reshape({-1, kNumParams}).to(at::kFloat).contiguous();
  const int64_t count = flat.size(0);
  TORCH_CHECK(
      grad_rotation.numel() == count * 64, "so8t_cpp: grad_rotation has shape ", grad_rotation.sizes(),
      "; expected ", theta.sizes().slice(0, theta.dim() - 1), " + [8, 8]");
  const at::Tensor grad_flat = grad_rotation.reshape({count, kBlockSize, kBlockSize}).to(at::kFloat).contiguous();
  at::Tensor grad_theta = at::empty({count, kNumParams}, flat.options());
  const float* theta_data = flat.const_data_ptr<float>();
  const float* grad_data = grad_flat.const_data_ptr<float>();
  float* out_data = grad_theta.mutable_data_ptr<float>();
  at::parallel_for(0, count, kMatricesPerTask, [&](int64_t begin, int64_t end) {
    exp_backward_range(theta_data, grad_data, out_data, begin, end);
  });
  return grad_theta.view(theta.sizes()).to(theta.scalar_type());
}

}  // namespace so8t
