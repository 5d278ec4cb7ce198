// Full: the uncompressed cache (the identity plan). Every other method's error
// is measured against it, and its own error must be exactly zero.
#pragma once

#include "kvscope/reference/registry.hpp"

namespace kvscope::ref {

FamilyInfo full_family();

}  // namespace kvscope::ref
