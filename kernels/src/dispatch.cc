// Run-time choice of the kernel implementation (cpuid), overridable with SRBINARIZE_KERNEL.
#include "dispatch.h"

#include <cstdlib>
#include <cstring>

namespace srb {

bool KernelsSupported(const Kernels& k) {
  __builtin_cpu_init();  // __builtin_cpu_supports also checks that the OS saves the AVX registers
#ifdef SRB_EMULATED_AVX512  // test build: kernel_avx512.cc emulates its intrinsics (kernels/testing)
  if (&k == &kAvx512Kernels) return __builtin_cpu_supports("avx2");
#else
  if (&k == &kAvx512Kernels)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vpopcntdq");
#endif
  if (&k == &kAvx2Kernels) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return true;
}

const Kernels* SelectKernels(std::string* error) {
  const Kernels* all[] = {&kAvx512Kernels, &kAvx2Kernels, &kScalarKernels};  // best first
  const char* forced = std::getenv("SRBINARIZE_KERNEL");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0) {
    for (const Kernels* k : all)
      if (KernelsSupported(*k)) return k;
    return &kScalarKernels;
  }
  for (const Kernels* k : all) {
    if (std::strcmp(forced, k->name) != 0) continue;
    if (KernelsSupported(*k)) return k;
    *error = std::string("SRBINARIZE_KERNEL=") + forced + ": this CPU does not support the " +
             forced + " kernels (avx512 needs AVX512F and AVX512_VPOPCNTDQ, avx2 needs AVX2 and POPCNT)";
    return nullptr;
  }
  *error = std::string("SRBINARIZE_KERNEL=") + forced +
           ": unknown kernel path (expected auto, avx512, avx2 or scalar)";
  return nullptr;
}

}  // namespace srb
