// Mean, variance, min and max of the finite values of a tensor, reduced part by part (tiles of
// logit_stats, rows of linear_cross_entropy) and merged in a fixed order, so results do not depend
// on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace so8t {

struct FiniteMoments {
  int64_t count = 0;  // finite values
  double mean = 0.0;
  double m2 = 0.0;  // Σ (v − mean)² over the finite values
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();

  // Chan, Golub & LeVeque (1979): (n_a, mean_a, M2_a) merged with (n_b, mean_b, M2_b).
  void merge(const FiniteMoments& part) {
    if (part.count == 0) return;
    const double own = static_cast<double>(count);
    const double other = static_cast<double>(part.count);
    const double total = own + other;
    const double delta = part.mean - mean;
    mean += delta * other / total;
    m2 += part.m2 + delta * delta * own * other / total;
    count += part.count;
    min = std::min(min, part.min);
    max = std::max(max, part.max);
  }

  // out[0..3] = mean, std (population), min, max; NaN when no value was finite.
  void write(float* out) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const bool any = count > 0;
    out[0] = any ? static_cast<float>(mean) : nan;
    out[1] = any ? static_cast<float>(std::sqrt(m2 / static_cast<double>(count))) : nan;
    out[2] = any ? min : nan;
    out[3] = any ? max : nan;
  }
};

}  // namespace so8t
