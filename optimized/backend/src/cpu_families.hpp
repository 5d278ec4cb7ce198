// Makers of the CPU backend's families that live in their own files
// (cpu_<family>.cpp), registered in cpu_methods.cpp's makers() map.
#pragma once

#include <memory>

#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/registry.hpp"

namespace kvscope::opt {

std::unique_ptr<BackendMethod> make_cpu_kvmerger(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_weightedkv(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_ems(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_cam(const MethodSpec& spec, const ref::Params& p);

}  // namespace kvscope::opt
