// Run-time choice between a baseline and an AVX2 + FMA build of the same loop (x86-64 + GCC or
// Clang): the loop is an always-inline template or function, wrapped once plainly and once in
// PANORAY_TARGET_AVX2, and use_avx2() picks. (GCC's target_clones("arch=haswell") would test for
// the Haswell model itself, not its features.) The wheel then still runs on older CPUs.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define PANORAY_X86_DISPATCH 1
#define PANORAY_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PANORAY_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PANORAY_X86_DISPATCH 0
#define PANORAY_ALWAYS_INLINE inline
#endif

namespace panoray {

// Whether this CPU runs the AVX2 + FMA builds.
inline bool use_avx2() {
#if PANORAY_X86_DISPATCH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace panoray
