// A dense row-major float tensor with a shape: the in-memory form of trace
// datasets. Values are fp32 in memory whatever the storage dtype (fp32 holds
// every fp16 and bf16 value exactly).
#pragma once

#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

namespace kvscope {

struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<std::int64_t> s)
      : shape(std::move(s)), data(static_cast<std::size_t>(count(shape)), 0.0f) {}

  static std::int64_t count(const std::vector<std::int64_t>& s) {
    return std::accumulate(s.begin(), s.end(), std::int64_t{1}, std::multiplies<>());
  }
  std::int64_t size() const { return static_cast<std::int64_t>(data.size()); }
  int rank() const { return static_cast<int>(shape.size()); }
  std::int64_t dim(int i) const { return shape[static_cast<std::size_t>(i)]; }

  /// Row `t` of head `h` of a rank-3 [heads, tokens, dim] tensor.
  std::span<const float> row(std::int64_t h, std::int64_t t) const {
    const std::int64_t d = shape[2];
    return {data.data() + (h * shape[1] + t) * d, static_cast<std::size_t>(d)};
  }
  std::span<float> row(std::int64_t h, std::int64_t t) {
    const std::int64_t d = shape[2];
    return {data.data() + (h * shape[1] + t) * d, static_cast<std::size_t>(d)};
  }
  /// Element (h, t) of a rank-2 [heads, tokens] tensor.
  float at(std::int64_t h, std::int64_t t) const { return data[static_cast<std::size_t>(h * shape[1] + t)]; }
};

}  // namespace kvscope
