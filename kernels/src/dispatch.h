// Run-time selection of the kernel implementation.
#pragma once

#include <string>

#include "kernels.h"

namespace srb {

// Whether this CPU (and OS) can run an implementation.
bool KernelsSupported(const Kernels& k);

// The implementation named by SRBINARIZE_KERNEL (avx512, avx2, scalar), or the best supported one
// when it is unset, empty or "auto". nullptr and *error set when the forced path is unknown or
// unsupported here.
const Kernels* SelectKernels(std::string* error);

}  // namespace srb
