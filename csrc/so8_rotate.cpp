// Gated block rotation y_b = M_b x_b, M_b = (1 − g)I + gR_b, and its backward: the semantics of
// rotate_reference, rotate_backward_reference and activation_stats_reference in so8t_kernels/so8_rotate.py.
//
// Memory bound: the forward reads x and writes y once (8 FMAs per value) and reduces the activation
// statistics from y while it is in registers. The backward reads dy and x once, writes dx and sums
// S_b = Σ_tokens dy_b x_bᵀ into one partial per chunk of tokens; the partials are added in chunk order
// afterwards: no atomics, and the same bits for any thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sigmoid.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "so8t.h"

namespace so8t {
namespace {

// Tiles of 64 blocks (M and S tiles of 16 KB each, resident in L1), walked block by block in passes of
// 16 rows, so that M_b (and S_b) sit in 8 registers for 16 rows and every cache line of x, dy, y and
// dx is used twice (by two blocks) while still in L1. A standalone copy of the backward kernel at
// 4096×3072 fp32, 2 threads, CPU time: 1.3× a clone, against 1.5× in passes of 4 rows (blocks inner)
// and 1.8× in passes of 128 rows.
constexpr int64_t kBlocksPerTile = 64;
constexpr int64_t kRowsPerPass = 16;
// Forward work item and statistics partial: whole rows, ~64k values (256 KB of fp32 x).
constexpr int64_t kValuesPerRowGroup = 1 << 16;
// Backward: at most 32 token chunks of ≥ 16 tokens, so the S partials stay small (3 MB at d = 3072,
// against 100 MB of dy and x read at 4096 tokens).
constexpr int64_t kMaxTokenChunks = 32;
constexpr int64_t kMinTokensPerChunk = 16;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

struct ActivationStats {
  double sum_squares = 0.0;
  float max_abs = 0.0f;
  int64_t nonfinite = 0;
};

template <typename T>
struct ForwardArgs {
  const T* x;
  int64_t x_row_stride;
  const float* mixing_t;  // [m, 8, 8]: M_bᵀ, so that column j of M_b is a row
  T* y;                   // [rows, 8m], contiguous
  int64_t num_blocks;
};

// One 8-wide block of kRowsPerPass rows as fp32. The 8 lanes of a chunk are broadcast one by one, which
// from a register takes two shuffles on the one shuffle port and from memory none: bf16/fp16 chunks
// are widened into a 512-byte buffer first, fp32 ones are read in place.
template <typename T>
struct Fp32Block {
  const float* data;
  int64_t row_stride;
  float buffer[kRowsPerPass * kBlockSize];

  SO8T_INLINE Fp32Block(const T* source, int64_t source_row_stride, int64_t rows) {
    if constexpr (std::is_same_v<T, float>) {
      data = source;
      row_stride = source_row_stride;
    } else {
      for (int64_t row = 0; row < rows; ++row) {
        store8(buffer + row * kBlockSize, load8(source + row * source_row_stride));
      }
      data = buffer;
      row_stride = kBlockSize;
    }
  }

  SO8T_INLINE const float* row(int64_t index) const {
    return data + index * row_stride;
  }
};

// args by value: a local copy, which the stores through y (memcpy, may alias anything) cannot change,
// so its fields stay in registers instead of being reloaded for every row.
template <typename T, bool kWithStats>
SO8T_INLINE void rotate_forward_rows(
    const ForwardArgs<T> args, int64_t row_begin, int64_t row_end, ActivationStats* stats) {
  const int64_t hidden = args.num_blocks * kBlockSize;
  for (int64_t tile_begin = 0; tile_begin < args.num_blocks; tile_begin += kBlocksPerTile) {
    const int64_t tile_end = std::min(args.num_blocks, tile_begin + kBlocksPerTile);
    for (int64_t pass_begin = row_begin; pass_begin < row_end; pass_begin += kRowsPerPass) {
      const int64_t pass_rows = std::min(row_end - pass_begin, kRowsPerPass);
      f32x8 max_abs = splat(0.0f);
      i32x8 nonfinite = i32x8{};
      for (int64_t block = tile_begin; block < tile_end; ++block) {
        const Mat8 mixing_t = load_mat8(args.mixing_t + block * 64);
        const Fp32Block<T> x(
            args.x + pass_begin * args.x_row_stride + block * kBlockSize, args.x_row_stride, pass_rows);
        T* y = args.y + pass_begin * hidden + block * kBlockSize;
        f32x8 sum_squares = splat(0.0f);
        for (int64_t row = 0; row < pass_rows; ++row) {
          const float* x_chunk = x.row(row);
          f32x8 y_chunk = x_chunk[0] * mixing_t.row[0];  // y = Σ_j x_j column_j(M)
          for (int j = 1; j < 8; ++j) y_chunk += x_chunk[j] * mixing_t.row[j];
          const f32x8 stored = store8(y + row * hidden, y_chunk);
          if constexpr (kWithStats) {
            // Measured on the values as stored: an fp16 overflow to inf counts as non-finite.
            const i32x8 finite = finite_mask(stored);
            const f32x8 magnitude = select(finite, abs8(stored), splat(0.0f));
            sum_squares += magnitude * magnitude;
            max_abs = max8(max_abs, magnitude);
            nonfinite += ~finite & 1;
          }
        }
        // ≤ 16 values per lane in fp32, then fp64: Σ y² stays accurate for any shape.
        if constexpr (kWithStats) stats->sum_squares += horizontal_sum(sum_squares);
      }
      if constexpr (kWithStats) {
        for (int lane = 0; lane < 8; ++lane) {
          stats->max_abs = std::max(stats->max_abs, max_abs[lane]);
          stats->nonfinite += nonfinite[lane];
        }
      }
    }
  }
}

template <typename T>
SO8T_INLINE void rotate_forward_rows_dispatch(
    const ForwardArgs<T>& args, int64_t row_begin, int64_t row_end, ActivationStats* stats) {
  if (stats != nullptr) {
    rotate_forward_rows<T, true>(args, row_begin, row_end, stats);
  } else {
    rotate_forward_rows<T, false>(args, row_begin, row_end, nullptr);
  }
}

SO8T_MULTIVERSION void rotate_forward_kernel(
    const ForwardArgs<float>& args, int64_t row_begin, int64_t row_end, ActivationStats* stats) {
  rotate_forward_rows_dispatch(args, row_begin, row_end, stats);
}

SO8T_MULTIVERSION void rotate_forward_kernel(
    const ForwardArgs<c10::BFloat16>& args, int64_t row_begin, int64_t row_end, ActivationStats* stats) {
  rotate_forward_rows_dispatch(args, row_begin, row_end, stats);
}

SO8T_MULTIVERSION void rotate_forward_kernel(
    const ForwardArgs<c10::Half>& args, int64_t row_begin, int64_t row_end, ActivationStats* stats) {
  rotate_forward_rows_dispatch(args, row_begin, row_end, stats);
}

template <typename T>
struct BackwardArgs {
  const T* grad_y;
  int64_t grad_y_row_stride;
  const T* x;
  int64_t x_row_stride;
  const float* mixing;  // [m, 8, 8]
  T* grad_x;            // [rows, 8m], contiguous; null if not needed
  float* outer;         // [chunks, m, 8, 8] partial S_b; null if not needed
  int64_t num_blocks;
};

// One work item: the rows of one token chunk × one tile of blocks. dx_b = M_bᵀ dy_b = Σ_i dy_i row_i(M_b);
// row i of S_b += dy_i x_b, in token order, starting from zero.
template <typename T, bool kNeedX, bool kNeedParams>
SO8T_INLINE void rotate_backward_tile(
    const BackwardArgs<T> args, int64_t chunk, int64_t row_begin, int64_t row_end, int64_t tile_begin,
    int64_t tile_end) {
  const int64_t hidden = args.num_blocks * kBlockSize;
  float* outer = kNeedParams ? args.outer + chunk * args.num_blocks * 64 : nullptr;
  for (int64_t pass_begin = row_begin; pass_begin < row_end; pass_begin += kRowsPerPass) {
    const int64_t pass_rows = std::min(row_end - pass_begin, kRowsPerPass);
    for (int64_t block = tile_begin; block < tile_end; ++block) {
      const int64_t column = block * kBlockSize;
      Mat8 mixing;
      Mat8 outer_b;
      if constexpr (kNeedX) mixing = load_mat8(args.mixing + block * 64);
      if constexpr (kNeedParams) {
        if (pass_begin == row_begin) {
          for (int i = 0; i < 8; ++i) outer_b.row[i] = splat(0.0f);
        } else {
          outer_b = load_mat8(outer + block * 64);
        }
      }
      const Fp32Block<T> grad_y(
          args.grad_y + pass_begin * args.grad_y_row_stride + column, args.grad_y_row_stride, pass_rows);
      for (int64_t row = 0; row < pass_rows; ++row) {
        const float* dy = grad_y.row(row);
        if constexpr (kNeedX) {
          f32x8 dx = dy[0] * mixing.row[0];
          for (int i = 1; i < 8; ++i) dx += dy[i] * mixing.row[i];
          store8(args.grad_x + (pass_begin + row) * hidden + column, dx);
        }
        if constexpr (kNeedParams) {
          const f32x8 x = load8(args.x + (pass_begin + row) * args.x_row_stride + column);
          for (int i = 0; i < 8; ++i) outer_b.row[i] += dy[i] * x;
        }
      }
      if constexpr (kNeedParams) store_mat8(outer + block * 64, outer_b);
    }
  }
}

template <typename T>
SO8T_INLINE void rotate_backward_tile_dispatch(
    const BackwardArgs<T>& args, int64_t chunk, int64_t row_begin, int64_t row_end, int64_t tile_begin,
    int64_t tile_end) {
  if (args.grad_x != nullptr && args.outer != nullptr) {
    rotate_backward_tile<T, true, true>(args, chunk, row_begin, row_end, tile_begin, tile_end);
  } else if (args.grad_x != nullptr) {
    rotate_backward_tile<T, true, false>(args, chunk, row_begin, row_end, tile_begin, tile_end);
  } else {
    rotate_backward_tile<T, false, true>(args, chunk, row_begin, row_end, tile_begin, tile_end);
  }
}

SO8T_MULTIVERSION void rotate_backward_kernel(
    const BackwardArgs<float>& args, int64_t chunk, int64_t row_begin, int64_t row_end, int64_t tile_begin,
    int64_t tile_end) {
  rotate_backward_tile_dispatch(args, chunk, row_begin, row_end, tile_begin, tile_end);
}

SO8T_MULTIVERSION void rotate_backward_kernel(
    const BackwardArgs<c10::BFloat16>& args, int64_t chunk, int64_t row_begin, int64_t row_end,
    int64_t tile_begin, int64_t tile_end) {
  rotate_backward_tile_dispatch(args, chunk, row_begin, row_end, tile_begin, tile_end);
}

SO8T_MULTIVERSION void rotate_backward_kernel(
    const BackwardArgs<c10::Half>& args, int64_t chunk, int64_t row_begin, int64_t row_end, int64_t tile_begin,
    int64_t tile_end) {
  rotate_backward_tile_dispatch(args, chunk, row_begin, row_end, tile_begin, tile_end);
}

// [..., d] → [N, d] with unit stride along d (a copy only if the input needs one).
at::Tensor as_rows(const at::Tensor& tensor) {
  at::Tensor rows = tensor.reshape({-1, tensor.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// g = σ(α), computed by ATen in fp32 like the reference.
float gate_of(const at::Tensor& alpha) {
  return at::sigmoid(alpha.to(at::kFloat)).item<float>();
}

// M_b = (1 − g)I + gR_b as fp32 [m, 8, 8], or its transpose per block.
at::Tensor mixing_matrices(const at::Tensor& rotation_f, float gate, bool transposed) {
  at::Tensor mixing = at::empty(rotation_f.sizes(), rotation_f.options());
  const float* r = rotation_f.const_data_ptr<float>();
  float* m = mixing.mutable_data_ptr<float>();
  for (int64_t block = 0; block < rotation_f.size(0); ++block) {
    for (int i = 0; i < 8; ++i) {
      for (int j = 0; j < 8; ++j) {
        const float value = (i == j ? 1.0f - gate : 0.0f) + gate * r[block * 64 + i * 8 + j];
        m[block * 64 + (transposed ? j * 8 + i : i * 8 + j)] = value;
      }
    }
  }
  return mixing;
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
  const at::Tensor rotation_f = rotation.to(at::kFloat).contiguous();
  const at::Tensor mixing_t = mixing_matrices(rotation_f, gate_of(alpha), /*transposed=*/true);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));

  const int64_t rows_per_group = std::max<int64_t>(1, kValuesPerRowGroup / rows.size(1));
  const int64_t num_groups = ceil_div(num_rows, rows_per_group);
  std::vector<ActivationStats> group_stats(with_stats ? num_groups : 0);
  dispatch_float_types(x.scalar_type(), "so8t_cpp::rotate_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const ForwardArgs<scalar_t> args{
        rows.const_data_ptr<scalar_t>(), rows.stride(0), mixing_t.const_data_ptr<float>(),
        y.mutable_data_ptr<scalar_t>(), num_blocks};
    at::parallel_for(0, num_groups, 1, [&](int64_t group_begin, int64_t group_end) {
      for (int64_t group = group_begin; group < group_end; ++group) {
        const int64_t row_begin = group * rows_per_group;
        rotate_forward_kernel(
            args, row_begin, std::min(num_rows, row_begin + rows_per_group),
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
  const at::Tensor rotation_f = rotation.to(at::kFloat).contiguous();
  const float gate = gate_of(alpha);
  const at::Tensor mixing = mixing_matrices(rotation_f, gate, /*transposed=*/false);

  const int64_t rows_per_chunk = std::max(kMinTokensPerChunk, ceil_div(num_rows, kMaxTokenChunks));
  const int64_t num_chunks = ceil_div(num_rows, rows_per_chunk);
  const int64_t num_tiles = ceil_div(num_blocks, kBlocksPerTile);
  const at::TensorOptions float_options = rows.options().dtype(at::kFloat);
  at::Tensor grad_rows_x = need_x ? at::empty(rows.sizes(), rows.options()) : at::Tensor();
  at::Tensor outer_partial = need_params ? at::empty({num_chunks, num_blocks, 64}, float_options) : at::Tensor();

  dispatch_float_types(rows.scalar_type(), "so8t_cpp::rotate_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const BackwardArgs<scalar_t> args{
        grad_rows.const_data_ptr<scalar_t>(),
        grad_rows.stride(0),
        rows.const_data_ptr<scalar_t>(),
        rows.stride(0),
        mixing.const_data_ptr<float>(),
        need_x ? grad_rows_x.mutable_data_ptr<scalar_t>() : nullptr,
        need_params ? outer_partial.mutable_data_ptr<float>() : nullptr,
        num_blocks};
    at::parallel_for(0, num_chunks * num_tiles, 1, [&](int64_t item_begin, int64_t item_end) {
      for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t chunk = item / num_tiles;
        const int64_t tile_begin = (item % num_tiles) * kBlocksPerTile;
        const int64_t row_begin = chunk * rows_per_chunk;
        rotate_backward_kernel(
            args, chunk, row_begin, std::min(num_rows, row_begin + rows_per_chunk), tile_begin,
            std::min(num_blocks, tile_begin + kBlocksPerTile));
      }
    });
  });

  if (need_x) grad_x = grad_rows_x.view(x.sizes()).to(x.scalar_type());
  if (need_params) {
    // S_b = Σ_chunks partial_b in chunk order; dR_b = g S_b; dα = g(1 − g) Σ_b ⟨S_b, R_b − I⟩
    // (_param_grads in so8_rotate.py), with ⟨S_b, R_b − I⟩ per block summed in block order.
    at::Tensor grad_rotation_f = at::empty({num_blocks, kBlockSize, kBlockSize}, float_options);
    std::vector<double> block_grad_gate(num_blocks);
    const float* partial = outer_partial.const_data_ptr<float>();
    const float* r = rotation_f.const_data_ptr<float>();
    float* out = grad_rotation_f.mutable_data_ptr<float>();
    at::parallel_for(0, num_blocks, 16, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        float outer[64] = {};
        for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
          const float* chunk_outer = partial + (chunk * num_blocks + block) * 64;
          for (int index = 0; index < 64; ++index) outer[index] += chunk_outer[index];
        }
        double grad_gate = 0.0;
        for (int index = 0; index < 64; ++index) {
          const float eye = index % 9 == 0 ? 1.0f : 0.0f;  // diagonal of the row-major 8×8 block
          grad_gate += static_cast<double>(outer[index] * (r[block * 64 + index] - eye));
          out[block * 64 + index] = gate * outer[index];
        }
        block_grad_gate[block] = grad_gate;
      }
    });
    double grad_gate = 0.0;
    for (const double value : block_grad_gate) grad_gate += value;
    grad_rotation = grad_rotation_f.to(rotation.scalar_type());
    grad_alpha = at::scalar_tensor(gate * (1.0f - gate) * static_cast<float>(grad_gate), float_options)
                     .to(alpha.scalar_type());
  }
  return {grad_x, grad_rotation, grad_alpha};
}

}  // namespace so8t
