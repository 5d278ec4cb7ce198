// Registration of the suite's benchmarks (programmatic: names carry the
// dtype, method family and thread count chosen at run time).
#pragma once

namespace kvscope::bench {

void register_kernel_benchmarks();
void register_merge_kernel_benchmarks();
void register_method_benchmarks();

}  // namespace kvscope::bench
