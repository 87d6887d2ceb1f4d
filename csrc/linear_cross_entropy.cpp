// Chunked linear cross-entropy: the semantics of linear_cross_entropy_reference in
// so8t_kernels/linear_cross_entropy.py. Per chunk of C tokens, one ATen matmul makes the logits
// [C, V]; each row is then reduced and turned into its gradient in one visit while it sits in L2
// (a 49,152-entry fp32 row is 192 KB): pass 1 reads max/min/sum (and proves the row finite), pass 2
// computes exp(z − max) with a polynomial exp on 8 lanes, Σ e, Σ e·(z − max) and Σ (z − mean)², and
// keeps e in place, pass 3 scales e into (p − one-hot)·s. Two more matmuls turn the chunk's gradient
// into dL/dhidden rows and its share of dL/dweight. Row results merge in row order (Chan's formula in
// fp64 for the statistics), so every thread count gives the same bits.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "moments.h"
#include "simd.h"
#include "so8t.h"

namespace so8t {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// fp32 vector sums are flushed into fp64 every 1024 values (128 adds per lane): the statistics keep
// ~1e-7 relative accuracy on 49,152-entry rows instead of drifting with the row length.
constexpr int64_t kFlush = 1024;

struct RowResult : FiniteMoments {  // the row's finite logits
  double loss = 0.0;  // 0 for ignored tokens
  double entropy = 0.0;
  bool correct = false;
  int64_t nonfinite = 0;
};

struct RowTask {
  int64_t label;
  bool valid;
  float scale;  // the token's factor in dL/dz: 1/count ("mean"), 1 ("sum"), dL/dloss_i ("none")
  bool write_grad;
  bool with_stats;
};

SO8T_INLINE double lane_sum(f32x8 v) {
  double total = 0.0;
  for (int lane = 0; lane < 8; ++lane) total += v[lane];
  return total;
}

// exp(x) for x ≤ 0 (Cephes expf: x = n ln2 + r, |r| ≤ ln2/2, degree-6 polynomial, ≤ 2 ulp), 0 below
// −87.3 where expf leaves the normal range; exactly 1 at x = 0 (the row maximum).
SO8T_INLINE f32x8 exp_nonpositive(f32x8 x) {
  const i32x8 underflow = x < splat(-87.3365f);
  const f32x8 magic = splat(12582912.0f);  // 1.5 · 2^23: adding it rounds to an integer
  const f32x8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  f32x8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  f32x8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const f32x8 y = p * r * r + r + splat(1.0f);
  const i32x8 exponent = (__builtin_convertvector(n, i32x8) + 127) << 23;
  return select(underflow, splat(0.0f), y * (f32x8)exponent);
}

SO8T_INLINE float exp_nonpositive(float x) {
  return exp_nonpositive(splat(x))[0];
}

// Pass 1: max, min, Σ over the row. The sum is finite exactly when every value is (an inf or NaN
// reaches it), barring fp32 overflow of a finite row, which the masked recount below then handles.
SO8T_INLINE void row_extremes(const float* z, int64_t vocab, RowResult* out) {
  const int64_t vector_end = vocab - vocab % 8;
  double total = 0.0;
  f32x8 low = splat(kInf), high = splat(-kInf);
  for (int64_t block = 0; block < vector_end; block += kFlush) {
    const int64_t block_end = std::min(block + kFlush, vector_end);
    f32x8 sum = splat(0.0f);
    for (int64_t i = block; i < block_end; i += 8) {
      const f32x8 v = load8(z + i);
      sum += v;
      low = min8(v, low);
      high = max8(v, high);
    }
    total += lane_sum(sum);
  }
  float lo = kInf, hi = -kInf;
  for (int lane = 0; lane < 8; ++lane) {
    lo = std::min(lo, low[lane]);
    hi = std::max(hi, high[lane]);
  }
  for (int64_t i = vector_end; i < vocab; ++i) {
    total += z[i];
    lo = std::min(lo, z[i]);
    hi = std::max(hi, z[i]);
  }
  if (std::isfinite(total) && std::isfinite(lo) && std::isfinite(hi)) {
    out->count = vocab;
    out->mean = total / static_cast<double>(vocab);
    out->min = lo;
    out->max = hi;
    return;
  }
  // Rare: a non-finite value (or an fp32 overflow): count and skip the non-finite ones, in fp64.
  total = 0.0;
  out->count = 0;
  out->min = kInf;
  out->max = -kInf;
  for (int64_t i = 0; i < vocab; ++i) {
    if (!std::isfinite(z[i])) continue;
    total += z[i];
    ++out->count;
    out->min = std::min(out->min, z[i]);
    out->max = std::max(out->max, z[i]);
  }
  out->nonfinite = vocab - out->count;
  out->mean = out->count ? total / static_cast<double>(out->count) : 0.0;
}

// Σ (z − mean)² over the finite values of a row that holds non-finite ones (statistics only).
SO8T_INLINE double masked_m2(const float* z, int64_t vocab, double mean) {
  double m2 = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isfinite(z[i])) m2 += (z[i] - mean) * (z[i] - mean);
  }
  return m2;
}

// The row's reduction and, with task.write_grad, its gradient written to grad_row (may alias z).
// z is an fp32 row the kernel may overwrite (the logits row itself, or a widened copy).
template <typename T>
SO8T_INLINE void reduce_row(float* z, T* grad_row, int64_t vocab, const RowTask& task, RowResult* out) {
  row_extremes(z, vocab, out);
  const bool finite = out->nonfinite == 0;
  const bool in_vocab = task.label >= 0 && task.label < vocab;
  const float target = in_vocab ? z[task.label] : 0.0f;
  const bool store_exp = task.write_grad && task.valid && finite;
  if (finite) {
    const float row_max = out->max;
    const f32x8 max_v = splat(row_max);
    const f32x8 mean_v = splat(static_cast<float>(out->mean));
    const int64_t vector_end = vocab - vocab % 8;
    double total = 0.0, weighted = 0.0, m2 = 0.0;
    for (int64_t block = 0; block < vector_end; block += kFlush) {
      const int64_t block_end = std::min(block + kFlush, vector_end);
      f32x8 sum_e = splat(0.0f), sum_es = splat(0.0f), sum_c2 = splat(0.0f);
      for (int64_t i = block; i < block_end; i += 8) {
        const f32x8 v = load8(z + i);
        const f32x8 shifted = v - max_v;
        const f32x8 e = exp_nonpositive(shifted);
        sum_e += e;
        sum_es += e * shifted;
        if (task.with_stats) {
          const f32x8 centred = v - mean_v;
          sum_c2 += centred * centred;
        }
        if (store_exp) store8(z + i, e);
      }
      total += lane_sum(sum_e);
      weighted += lane_sum(sum_es);
      m2 += lane_sum(sum_c2);
    }
    for (int64_t i = vector_end; i < vocab; ++i) {
      const float shifted = z[i] - row_max;
      const float e = exp_nonpositive(shifted);
      total += e;
      weighted += static_cast<double>(e) * shifted;
      if (task.with_stats) {
        const float centred = z[i] - static_cast<float>(out->mean);
        m2 += centred * centred;
      }
      if (store_exp) z[i] = e;
    }
    out->m2 = m2;
    const double log_total = std::log(total);
    out->entropy = log_total - weighted / total;
    if (task.valid) {
      out->loss = in_vocab ? log_total + row_max - target : std::numeric_limits<double>::quiet_NaN();
      out->correct = in_vocab && target == row_max;
    }
    if (store_exp) {
      const float label_exp = z[task.label];  // read before the scaling below overwrites an aliased row
      const f32x8 factor = splat(static_cast<float>(task.scale / total));
      for (int64_t i = 0; i < vector_end; i += 8) store8(grad_row + i, load8(z + i) * factor);
      for (int64_t i = vector_end; i < vocab; ++i) grad_row[i] = static_cast<T>(z[i] * static_cast<float>(task.scale / total));
      // One-hot term: (p − 1)·s at the label, from p in fp32 before its rounding to T.
      grad_row[task.label] = static_cast<T>((label_exp / static_cast<float>(total) - 1.0f) * task.scale);
    }
  } else {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    if (task.with_stats) out->m2 = masked_m2(z, vocab, out->mean);
    out->entropy = nan;
    if (task.valid) out->loss = nan;
  }
  if (task.write_grad && !store_exp) {
    const float fill = task.valid ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    std::fill(grad_row, grad_row + vocab, static_cast<T>(fill));
  }
}

struct ChunkArgs {
  const int64_t* labels;
  const bool* valid;
  const float* scales;  // per token, or one value for all (scale_stride 0)
  int64_t scale_stride;
  bool write_grad;
  bool with_stats;
};

SO8T_INLINE RowTask task_for(const ChunkArgs& args, int64_t token) {
  return RowTask{args.labels[token], args.valid[token], args.scales[token * args.scale_stride], args.write_grad,
                 args.with_stats};
}

// fp32 rows are reduced in place; the gradient overwrites the logits.
SO8T_MULTIVERSION void reduce_rows(
    float* logits, int64_t vocab, int64_t first_token, const ChunkArgs& args, RowResult* results, int64_t begin,
    int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    float* z = logits + row * vocab;
    reduce_row(z, z, vocab, task_for(args, first_token + row), &results[first_token + row]);
  }
}

// bf16/fp16 rows are widened into an fp32 row buffer, reduced there, and the gradient rounded back.
template <typename T>
SO8T_INLINE void reduce_rows_widened(
    T* logits, int64_t vocab, int64_t first_token, const ChunkArgs& args, RowResult* results, int64_t begin,
    int64_t end) {
  std::vector<float> buffer(vocab);
  const int64_t vector_end = vocab - vocab % 8;
  for (int64_t row = begin; row < end; ++row) {
    T* source = logits + row * vocab;
    for (int64_t i = 0; i < vector_end; i += 8) store8(buffer.data() + i, load8(source + i));
    for (int64_t i = vector_end; i < vocab; ++i) buffer[i] = static_cast<float>(source[i]);
    reduce_row(buffer.data(), source, vocab, task_for(args, first_token + row), &results[first_token + row]);
  }
}

SO8T_MULTIVERSION void reduce_rows(
    c10::BFloat16* logits, int64_t vocab, int64_t first_token, const ChunkArgs& args, RowResult* results,
    int64_t begin, int64_t end) {
  reduce_rows_widened(logits, vocab, first_token, args, results, begin, end);
}

SO8T_MULTIVERSION void reduce_rows(
    c10::Half* logits, int64_t vocab, int64_t first_token, const ChunkArgs& args, RowResult* results, int64_t begin,
    int64_t end) {
  reduce_rows_widened(logits, vocab, first_token, args, results, begin, end);
}

// Row results → the [7] statistics: Chan, Golub & LeVeque (1979) over the rows in order, then the
// entropy and top-1 accuracy over the non-ignored tokens (NaN when there are none).
at::Tensor merge_stats(const std::vector<RowResult>& results, const bool* valid, const at::TensorOptions& options) {
  FiniteMoments moments;
  double entropy = 0.0, correct = 0.0, tokens = 0.0;
  int64_t nonfinite = 0;
  for (size_t token = 0; token < results.size(); ++token) {
    const RowResult& row = results[token];
    moments.merge(row);
    nonfinite += row.nonfinite;
    if (valid[token]) {
      tokens += 1.0;
      entropy += row.entropy;
      correct += row.correct ? 1.0 : 0.0;
    }
  }
  at::Tensor stats = at::empty({7}, options.dtype(at::kFloat));
  float* out = stats.mutable_data_ptr<float>();
  moments.write(out);
  out[4] = static_cast<float>(nonfinite);
  out[5] = static_cast<float>(entropy / tokens);  // 0/0 = NaN when every token is ignored
  out[6] = static_cast<float>(correct / tokens);
  return stats;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& labels_in, int64_t ignore_index, c10::string_view reduction,
    const std::optional<at::Tensor>& grad_scale, bool with_stats, bool need_hidden, bool need_weight, bool need_bias,
    int64_t chunk_size) {
  TORCH_CHECK(hidden_in.device().is_cpu() && weight_in.device().is_cpu() && labels_in.device().is_cpu(),
              "so8t_cpp: linear_cross_entropy takes CPU tensors");
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2 && hidden_in.size(1) == weight_in.size(1),
              "so8t_cpp: hidden [N, H] and weight [V, H] expected, got ", hidden_in.sizes(), " and ", weight_in.sizes());
  TORCH_CHECK(hidden_in.scalar_type() == weight_in.scalar_type(), "so8t_cpp: hidden and weight dtypes differ");
  TORCH_CHECK(reduction == "none" || reduction == "mean" || reduction == "sum", "so8t_cpp: unknown reduction ",
              reduction);
  TORCH_CHECK(chunk_size > 0, "so8t_cpp: chunk_size must be positive");
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t num_tokens = hidden.size(0), vocab = weight.size(0);
  TORCH_CHECK(labels.numel() == num_tokens, "so8t_cpp: one label per row of hidden expected");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  TORCH_CHECK(!need_bias || has_bias, "so8t_cpp: need_bias without a bias");

  const int64_t* label_data = labels.const_data_ptr<int64_t>();
  std::vector<uint8_t> valid_bytes(num_tokens);
  int64_t num_valid = 0;
  for (int64_t token = 0; token < num_tokens; ++token) {
    const int64_t label = label_data[token];
    if (label == ignore_index) continue;
    TORCH_CHECK(label >= 0 && label < vocab, "so8t_cpp: label ", label, " of token ", token, " is outside [0, ",
                vocab, ") and is not ignore_index (", ignore_index, ")");
    valid_bytes[token] = 1;
    ++num_valid;
  }
  const bool* valid = reinterpret_cast<const bool*>(valid_bytes.data());

  // Gradient factor per token: the incoming dL/dloss ("none", in the backward), else 1/count or 1.
  at::Tensor scales;
  int64_t scale_stride = 0;
  if (grad_scale.has_value() && grad_scale->defined()) {
    scales = grad_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(scales.numel() == num_tokens || scales.numel() == 1, "so8t_cpp: grad_scale must hold 1 or N values");
    scale_stride = scales.numel() == 1 ? 0 : 1;
  } else {
    const double factor = reduction == "mean" ? 1.0 / static_cast<double>(std::max<int64_t>(num_valid, 1)) : 1.0;
    scales = at::empty({1}, hidden.options().dtype(at::kFloat)).fill_(factor);
  }
  const bool write_grad = need_hidden || need_weight || need_bias;
  const ChunkArgs args{label_data, valid, scales.const_data_ptr<float>(), scale_stride, write_grad, with_stats};

  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, num_tokens));
  const at::Tensor logits = at::empty({num_tokens ? chunk : 0, vocab}, hidden.options());
  const at::Tensor weight_t = weight.t();
  at::Tensor grad_hidden = need_hidden ? at::empty_like(hidden) : hidden.new_empty({0});
  // dweight and dbias sum over the chunks in fp32; a bf16/fp16 chunk product goes through `update`.
  const bool fp32 = weight.scalar_type() == at::kFloat;
  at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor update = need_weight && !fp32 ? at::empty(weight.sizes(), weight.options()) : at::Tensor();
  at::Tensor grad_bias = need_bias ? at::zeros({vocab}, weight.options().dtype(at::kFloat)) : at::Tensor();
  std::vector<RowResult> results(num_tokens);

  for (int64_t start = 0; start < num_tokens; start += chunk) {
    const int64_t rows = std::min(chunk, num_tokens - start);
    at::Tensor z = logits.narrow(0, 0, rows);
    const at::Tensor hidden_chunk = hidden.narrow(0, start, rows);
    if (has_bias) {
      at::addmm_out(z, bias, hidden_chunk, weight_t);
    } else {
      at::mm_out(z, hidden_chunk, weight_t);
    }
    dispatch_float_types(z.scalar_type(), "so8t_cpp::linear_cross_entropy", [&](auto tag) {
      using scalar_t = decltype(tag);
      scalar_t* data = z.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        reduce_rows(data, vocab, start, args, results.data(), begin, end);
      });
    });
    if (need_hidden) {
      at::Tensor grad_rows = grad_hidden.narrow(0, start, rows);
      at::mm_out(grad_rows, z, weight);
    }
    if (need_weight) {
      if (fp32) {
        grad_weight.addmm_(z.t(), hidden_chunk);
      } else {
        at::mm_out(update, z.t(), hidden_chunk);
        grad_weight.add_(update);
      }
    }
    if (need_bias) grad_bias.add_(at::sum(z, {0}, false, at::kFloat));
  }

  const at::TensorOptions loss_options = hidden.options().dtype(at::kFloat);
  at::Tensor loss;
  if (reduction == "none") {
    loss = at::empty({num_tokens}, loss_options);
    float* out = loss.mutable_data_ptr<float>();
    for (int64_t token = 0; token < num_tokens; ++token) out[token] = static_cast<float>(results[token].loss);
  } else {
    double total = 0.0;
    for (const RowResult& row : results) total += row.loss;
    if (reduction == "mean") total /= static_cast<double>(std::max<int64_t>(num_valid, 1));
    loss = at::scalar_tensor(total, loss_options);
  }
  at::Tensor stats = with_stats ? merge_stats(results, valid, hidden.options()) : at::empty({0}, loss_options);
  if (need_weight && !fp32) grad_weight = grad_weight.to(weight.scalar_type());
  if (need_bias && bias.scalar_type() != at::kFloat) grad_bias = grad_bias.to(bias.scalar_type());
  return {loss, stats, grad_hidden, need_weight ? grad_weight : weight.new_empty({0}),
          need_bias ? grad_bias : weight.new_empty({0})};
}

}  // namespace so8t
