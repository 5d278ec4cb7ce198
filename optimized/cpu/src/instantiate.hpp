// Explicit instantiation of a kernel template for every storage type.
#pragma once

#include "kvscope/opt/cpu/storage.hpp"

#define KVSCOPE_CPU_INSTANTIATE(MACRO) \
  MACRO(float)                         \
  MACRO(::kvscope::opt::cpu::f16)      \
  MACRO(::kvscope::opt::cpu::bf16)
