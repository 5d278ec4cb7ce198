// Makers of the CPU backend's families that live in their own files
// (cpu_<family>.cpp), registered in cpu_methods.cpp's makers() map.
#pragma once

#include <memory>

#include "kvscope/opt/backend.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::opt {

std::unique_ptr<BackendMethod> make_cpu_kvmerger(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_weightedkv(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_ems(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_cam(const MethodSpec& spec, const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_dynamickv(const ref::Params& p);

/// The reference's reductions and pooling modes as the kernels' enums.
cpu::Reduce to_cpu(ref::Reduce r);
cpu::Pool to_cpu(ref::Pool p);

/// Window scores of every q head, [q_heads, T] (cpu::window_scores on the layer's storage).
std::vector<float> window_scores(const LayerStorage& in, std::int64_t window, cpu::Reduce rows);

}  // namespace kvscope::opt
