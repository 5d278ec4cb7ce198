// RapidCheck generators for tests. rapidcheck's own doubles never produce
// special values and shrink poorly, so floats come from an integer grid
// (k * 2^-s, CUTLASS's int_scale idea): exact in double, shrink toward 0.
#pragma once

#include <rapidcheck.h>

#include <cstdint>

#include "kvscope/reference/attention.hpp"

namespace kvscope::tests {

/// A value on the grid {k / 16 : |k| <= 16 * bound}.
inline rc::Gen<double> grid_double(int bound) {
  return rc::gen::map(rc::gen::inRange(-16 * bound, 16 * bound + 1), [](int k) { return k / 16.0; });
}

/// A rows x cols matrix of grid values.
inline rc::Gen<ref::MatX> grid_matrix(std::int64_t rows, std::int64_t cols, int bound = 4) {
  return rc::gen::map(rc::gen::container<std::vector<double>>(static_cast<std::size_t>(rows * cols), grid_double(bound)),
                      [rows, cols](const std::vector<double>& v) {
                        ref::MatX m(rows, cols);
                        for (std::int64_t i = 0; i < rows * cols; ++i) m.data()[i] = v[static_cast<std::size_t>(i)];
                        return m;
                      });
}

inline rc::Gen<ref::VecX> grid_vector(std::int64_t n, int bound = 4) {
  return rc::gen::map(grid_matrix(n, 1, bound), [](const ref::MatX& m) { return ref::VecX(m.col(0)); });
}

}  // namespace kvscope::tests
