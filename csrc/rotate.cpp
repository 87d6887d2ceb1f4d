// Gated block rotation y_b = M_b x_b, M_b = (1 − g)I + gR_b, and its backward: the semantics of
// rotate_reference, rotate_backward_reference and activation_stats_reference in so8t_kernels/rotate.py.
//
// Memory bound: the forward reads x and writes y once (8 FMAs per value), with the activation
// statistics reduced from y while it is in registers. The backward reads dy and x once, writes dx and
// accumulates S_b = Σ_tokens dy_b x_bᵀ into per-token-chunk partial sums that are added in a fixed
// order afterwards: no atomics, and the same bits for any thread count.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "simd.h"
#include "so8t.h"

namespace so8t {
namespace {

// Forward statistics are reduced per group of ~64k values (whole rows), then over groups in order.
constexpr int64_t kValuesPerStatsGroup = 1 << 16;
// The fp32 Σ y² of a row is flushed to fp64 every 64 chunks (512 values) to keep it accurate for any d.
constexpr int64_t kBlocksPerFlush = 64;
// Backward work item: ≤ 32 blocks (S and M are 8 KB each, resident in L1) × one chunk of tokens.
constexpr int64_t kBlocksPerGroup = 32;
// S partial sums per block: at most 32 token chunks (3 MB at d = 3072), ≥ 16 tokens each.
constexpr int64_t kMaxTokenChunks = 32;
constexpr int64_t kMinTokensPerChunk = 16;
// Tokens per pass over a block: M_b and S_b (16 registers) are loaded once per 4 tokens, not per token.
constexpr int64_t kTokensPerStep = 4;

struct ActivationStats {
  double sum_squares = 0.0;
  float max_abs = 0.0f;
  int64_t nonfinite = 0;
};

struct RowsView {
  const void* data;
  int64_t row_stride;
  int64_t num_rows;
};

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T, bool kWithStats>
SO8T_INLINE void rotate_rows(
    const T* x, int64_t x_row_stride, const float* mixing_t, T* y, int64_t num_blocks, int64_t row_begin,
    int64_t row_end, ActivationStats* stats) {
  const int64_t hidden = num_blocks * kBlockSize;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x_row = x + row * x_row_stride;
    T* y_row = y + row * hidden;
    for (int64_t flush_begin = 0; flush_begin < num_blocks; flush_begin += kBlocksPerFlush) {
      const int64_t flush_end = std::min(num_blocks, flush_begin + kBlocksPerFlush);
      f32x8 sum_squares = splat(0.0f);
      f32x8 max_abs = splat(0.0f);
      i32x8 nonfinite = i32x8{};
      for (int64_t block = flush_begin; block < flush_end; ++block) {
        const f32x8 xv = load8(x_row + block * kBlockSize);
        // y = Σ_j x_j column_j(M): Mᵀ is stored so that column j of M is row j of mixing_t.
        const float* m = mixing_t + block * 64;
        f32x8 yv = xv[0] * load8(m);
        for (int j = 1; j < 8; ++j) yv += xv[j] * load8(m + 8 * j);
        const f32x8 stored = store8(y_row + block * kBlockSize, yv);
        if constexpr (kWithStats) {
          // Measured on the values as stored: an fp16 overflow to inf counts as non-finite.
          const i32x8 finite = finite_mask(stored);
          const f32x8 magnitude = select(finite, abs8(stored), splat(0.0f));
          sum_squares += magnitude * magnitude;
          max_abs = max8(max_abs, magnitude);
          nonfinite += ~finite & 1;
        }
      }
      if constexpr (kWithStats) {
        stats->sum_squares += horizontal_sum(sum_squares);
        for (int lane = 0; lane < 8; ++lane) {
          stats->max_abs = std::max(stats->max_abs, max_abs[lane]);
          stats->nonfinite += nonfinite[lane];
        }
      }
    }
  }
}

template <typename T>
SO8T_INLINE void rotate_rows_dispatch(
    const T* x, int64_t x_row_stride, const float* mixing_t, T* y, int64_t num_blocks, int64_t row_begin,
    int64_t row_end, ActivationStats* stats) {
  if (stats != nullptr) {
    rotate_rows<T, true>(x, x_row_stride, mixing_t, y, num_blocks, row_begin, row_end, stats);
  } else {
    rotate_rows<T, false>(x, x_row_stride, mixing_t, y, num_blocks, row_begin, row_end, nullptr);
  }
}

#define SO8T_DEFINE_ROTATE_ROWS(T)                                                                           \
  SO8T_MULTIVERSION void rotate_rows_kernel(                                                                 \
      const T* x, int64_t x_row_stride, const float* mixing_t, T* y, int64_t num_blocks, int64_t row_begin, \
      int64_t row_end, ActivationStats* stats) {                                                             \
    rotate_rows_dispatch<T>(x, x_row_stride, mixing_t, y, num_blocks, row_begin, row_end, stats);            \
  }
SO8T_DEFINE_ROTATE_ROWS(float)
SO8T_DEFINE_ROTATE_ROWS(c10::BFloat16)
SO8T_DEFINE_ROTATE_ROWS(c10::Half)
#undef SO8T_DEFINE_ROTATE_ROWS

// One backward work item: rows [row_begin, row_end) × blocks [block_begin, block_end).
// dx_b = M_bᵀ dy_b = Σ_i dy_i row_i(M_b); S_b += dy_b x_bᵀ, row i of S_b += dy_i x_b. M_b and S_b stay
// in registers across kTokensPerStep tokens, in token order.
template <typename T, bool kNeedX, bool kNeedParams>
SO8T_INLINE void rotate_backward_tile(
    const T* grad_y, int64_t grad_y_row_stride, const T* x, int64_t x_row_stride, const float* mixing, T* grad_x,
    float* outer, int64_t num_blocks, int64_t row_begin, int64_t row_end, int64_t block_begin, int64_t block_end) {
  const int64_t hidden = num_blocks * kBlockSize;
  for (int64_t step_begin = row_begin; step_begin < row_end; step_begin += kTokensPerStep) {
    const int64_t step_end = std::min(row_end, step_begin + kTokensPerStep);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t column = block * kBlockSize;
      Mat8 m;
      Mat8 s;
      if constexpr (kNeedX) m = load_mat8(mixing + block * 64);
      if constexpr (kNeedParams) s = load_mat8(outer + block * 64);
      for (int64_t row = step_begin; row < step_end; ++row) {
        const f32x8 dy = load8(grad_y + row * grad_y_row_stride + column);
        if constexpr (kNeedX) {
          f32x8 dx = dy[0] * m.row[0];
          for (int i = 1; i < 8; ++i) dx += dy[i] * m.row[i];
          store8(grad_x + row * hidden + column, dx);
        }
        if constexpr (kNeedParams) {
          const f32x8 xv = load8(x + row * x_row_stride + column);
          for (int i = 0; i < 8; ++i) s.row[i] += dy[i] * xv;
        }
      }
      if constexpr (kNeedParams) store_mat8(outer + block * 64, s);
    }
  }
}

template <typename T>
SO8T_INLINE void rotate_backward_dispatch(
    const T* grad_y, int64_t grad_y_row_stride, const T* x, int64_t x_row_stride, const float* mixing, T* grad_x,
    float* outer, int64_t num_blocks, int64_t row_begin, int64_t row_end, int64_t block_begin, int64_t block_end) {
  if (grad_x != nullptr && outer != nullptr) {
    rotate_backward_tile<T, true, true>(
        grad_y, grad_y_row_stride, x, x_row_stride, mixing, grad_x, outer, num_blocks, row_begin, row_end,
        block_begin, block_end);
  } else if (grad_x != nullptr) {
    rotate_backward_tile<T, true, false>(
        grad_y, grad_y_row_stride, x, x_row_stride, mixing, grad_x, outer, num_blocks, row_begin, row_end,
        block_begin, block_end);
  } else {
    rotate_backward_tile<T, false, true>(
        grad_y, grad_y_row_stride, x, x_row_stride, mixing, grad_x, outer, num_blocks, row_begin, row_end,
        block_begin, block_end);
  }
}

#define SO8T_DEFINE_ROTATE_BACKWARD(T)                                                                       \
  SO8T_MULTIVERSION void rotate_backward_kernel(                                                             \
      const T* grad_y, int64_t grad_y_row_stride, const T* x, int64_t x_row_stride, const float* mixing,     \
      T* grad_x, float* outer, int64_t num_blocks, int64_t row_begin, int64_t row_end, int64_t block_begin,  \
      int64_t block_end) {                                                                                   \
    rotate_backward_dispatch<T>(                                                                             \
        grad_y, grad_y_row_stride, x, x_row_stride, mixing, grad_x, outer, num_blocks, row_begin, row_end,   \
        block_begin, block_end);                                                                             \
  }
SO8T_DEFINE_ROTATE_BACKWARD(float)
SO8T_DEFINE_ROTATE_BACKWARD(c10::BFloat16)
SO8T_DEFINE_ROTATE_BACKWARD(c10::Half)
#undef SO8T_DEFINE_ROTATE_BACKWARD

// [..., d] → [N, d] with unit stride along d (a copy only if the input needs one).
at::Tensor as_rows(const at::Tensor& tensor) {
  at::Tensor rows = tensor.reshape({-1, tensor.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// g = σ(α) and M_b = (1 − g)I + gR_b [m, 8, 8], with the reference's fp32 operations (mixing_matrices).
std::pair<at::Tensor, at::Tensor> gate_and_mixing(const at::Tensor& rotation, const at::Tensor& alpha) {
  const at::Tensor gate = at::sigmoid(alpha.to(at::kFloat));
  const at::Tensor eye = at::eye(kBlockSize, rotation.options().dtype(at::kFloat));
  const at::Tensor mixing = (1 - gate) * eye + gate * rotation.to(at::kFloat);
  return {gate, mixing.contiguous()};
}

void check_inputs(const at::Tensor& x, const at::Tensor& rotation, const at::Tensor& alpha) {
  TORCH_CHECK(
      x.device().is_cpu() && rotation.device().is_cpu() && alpha.device().is_cpu(),
      "so8t_cpp: x, rotation and alpha must be CPU tensors");
  TORCH_CHECK(
      x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
      "so8t_cpp: x has dtype ", x.scalar_type(), "; expected float32, bfloat16 or float16");
  TORCH_CHECK(
      x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) % kBlockSize == 0, "so8t_cpp: x has shape ", x.sizes(),
      "; its last dimension must be a positive multiple of 8");
  const int64_t num_blocks = x.size(-1) / kBlockSize;
  TORCH_CHECK(
      rotation.dim() == 3 && rotation.size(0) == num_blocks && rotation.size(1) == kBlockSize &&
          rotation.size(2) == kBlockSize,
      "so8t_cpp: rotation has shape ", rotation.sizes(), "; expected (", num_blocks, ", 8, 8)");
  TORCH_CHECK(alpha.dim() == 0, "so8t_cpp: alpha has shape ", alpha.sizes(), "; expected a 0-d tensor");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotate_forward(
    const at::Tensor& x, const at::Tensor& rotation, const at::Tensor& alpha, bool with_stats) {
  check_inputs(x, rotation, alpha);
  const at::Tensor rows = as_rows(x);
  const int64_t num_rows = rows.size(0);
  const int64_t num_blocks = rows.size(1) / kBlockSize;
  const at::Tensor mixing_t = gate_and_mixing(rotation, alpha).second.transpose(1, 2).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));

  const int64_t rows_per_group = std::max<int64_t>(1, kValuesPerStatsGroup / rows.size(1));
  const int64_t num_groups = ceil_div(num_rows, rows_per_group);
  std::vector<ActivationStats> group_stats(with_stats ? num_groups : 0);
  dispatch_float_types(x.scalar_type(), "so8t_cpp::rotate_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x_data = rows.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    const float* mixing_data = mixing_t.const_data_ptr<float>();
    at::parallel_for(0, num_groups, 1, [&](int64_t group_begin, int64_t group_end) {
      for (int64_t group = group_begin; group < group_end; ++group) {
        const int64_t row_begin = group * rows_per_group;
        const int64_t row_end = std::min(num_rows, row_begin + rows_per_group);
        rotate_rows_kernel(
            x_data, rows.stride(0), mixing_data, y_data, num_blocks, row_begin, row_end,
            with_stats ? &group_stats[group] : nullptr);
      }
    });
  });

  at::Tensor stats = at::empty({with_stats ? 3 : 0}, x.options().dtype(at::kFloat));
  if (with_stats) {
    ActivationStats total;
    for (const ActivationStats& group : group_stats) {
      total.sum_squares += group.sum_squares;
      total.max_abs = std::max(total.max_abs, group.max_abs);
      total.nonfinite += group.nonfinite;
    }
    float* out = stats.mutable_data_ptr<float>();
    out[0] = static_cast<float>(total.sum_squares);
    out[1] = total.max_abs;
    out[2] = static_cast<float>(total.nonfinite);
  }
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rotate_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rotation, const at::Tensor& alpha,
    bool need_x, bool need_params) {
  check_inputs(x, rotation, alpha);
  TORCH_CHECK(
      grad_y.device().is_cpu() && grad_y.sizes() == x.sizes(), "so8t_cpp: grad_y has shape ", grad_y.sizes(),
      "; expected x's shape ", x.sizes());
  at::Tensor grad_x = x.new_empty({0});
  at::Tensor grad_rotation = x.new_empty({0});
  at::Tensor grad_alpha = x.new_empty({0});
  if (!need_x && !need_params) return {grad_x, grad_rotation, grad_alpha};

  // Both inputs are read in one dtype; a mixed pair (never produced by autograd) is read as fp32.
  const bool same_dtype = grad_y.scalar_type() == x.scalar_type();
  const at::Tensor grad_rows = as_rows(same_dtype ? grad_y : grad_y.to(at::kFloat));
  const at::Tensor rows = as_rows(same_dtype ? x : x.to(at::kFloat));
  const int64_t num_rows = rows.size(0);
  const int64_t num_blocks = rows.size(1) / kBlockSize;
  const auto [gate, mixing] = gate_and_mixing(rotation, alpha);

  const int64_t rows_per_chunk = std::max(kMinTokensPerChunk, ceil_div(num_rows, kMaxTokenChunks));
  const int64_t num_chunks = ceil_div(num_rows, rows_per_chunk);
  const int64_t num_groups = ceil_div(num_blocks, kBlocksPerGroup);
  at::Tensor grad_rows_x = need_x ? at::empty(rows.sizes(), rows.options()) : at::Tensor();
  at::Tensor outer_partial =
      need_params ? at::zeros({num_chunks, num_blocks, 64}, rows.options().dtype(at::kFloat)) : at::Tensor();

  dispatch_float_types(rows.scalar_type(), "so8t_cpp::rotate_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* grad_y_data = grad_rows.const_data_ptr<scalar_t>();
    const scalar_t* x_data = rows.const_data_ptr<scalar_t>();
    const float* mixing_data = mixing.const_data_ptr<float>();
    scalar_t* grad_x_data = need_x ? grad_rows_x.mutable_data_ptr<scalar_t>() : nullptr;
    float* outer_data = need_params ? outer_partial.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, num_chunks * num_groups, 1, [&](int64_t item_begin, int64_t item_end) {
      for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t chunk = item / num_groups;
        const int64_t group = item % num_groups;
        const int64_t row_begin = chunk * rows_per_chunk;
        const int64_t block_begin = group * kBlocksPerGroup;
        rotate_backward_kernel(
            grad_y_data, grad_rows.stride(0), x_data, rows.stride(0), mixing_data, grad_x_data,
            need_params ? outer_data + chunk * num_blocks * 64 : nullptr, num_blocks, row_begin,
            std::min(num_rows, row_begin + rows_per_chunk), block_begin,
            std::min(num_blocks, block_begin + kBlocksPerGroup));
      }
    });
  });

  if (need_x) grad_x = grad_rows_x.view(x.sizes()).to(x.scalar_type());
  if (need_params) {
    // S_b = Σ_chunks partial_b, summed in chunk order; then _param_grads of rotate.py.
    at::Tensor outer = at::zeros({num_blocks, kBlockSize, kBlockSize}, rows.options().dtype(at::kFloat));
    float* outer_data = outer.mutable_data_ptr<float>();
    const float* partial_data = outer_partial.const_data_ptr<float>();
    const int64_t size = num_blocks * 64;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const float* partial = partial_data + chunk * size;
      for (int64_t index = 0; index < size; ++index) outer_data[index] += partial[index];
    }
    const at::Tensor rotation_f = rotation.to(at::kFloat);
    const at::Tensor eye = at::eye(kBlockSize, outer.options());
    const at::Tensor grad_gate = (outer * (rotation_f - eye)).sum();
    grad_alpha = (gate * (1 - gate) * grad_gate).to(alpha.scalar_type());
    grad_rotation = (gate * outer).to(rotation.scalar_type());
  }
  return {grad_x, grad_rotation, grad_alpha};
}

}  // namespace so8t
