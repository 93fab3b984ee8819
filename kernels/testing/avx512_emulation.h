// Test-only: plain C++ stand-ins for the AVX-512 intrinsics kernel_avx512.cc uses, so that its
// logic (layouts, loops, transposition) can be tested on a CPU without AVX-512. Force-included
// (-include) by `python kernels/build.py --emulate-avx512`; never part of the real library.
#pragma once

#include <immintrin.h>  // first, so that the macros below leave the real declarations alone

#include <cstdint>
#include <cstring>

struct srb_emu_m512i {
  uint64_t v[8];
};

static inline srb_emu_m512i srb_emu_setzero() { return srb_emu_m512i{}; }

static inline srb_emu_m512i srb_emu_loadu(const void* p) {
  srb_emu_m512i r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}

static inline srb_emu_m512i srb_emu_set1_epi64(long long x) {
  srb_emu_m512i r;
  for (uint64_t& e : r.v) e = static_cast<uint64_t>(x);
  return r;
}

static inline srb_emu_m512i srb_emu_xor(srb_emu_m512i a, srb_emu_m512i b) {
  for (int i = 0; i < 8; ++i) a.v[i] ^= b.v[i];
  return a;
}

static inline srb_emu_m512i srb_emu_add_epi64(srb_emu_m512i a, srb_emu_m512i b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}

static inline srb_emu_m512i srb_emu_popcnt_epi64(srb_emu_m512i a) {
  for (uint64_t& e : a.v) e = static_cast<uint64_t>(__builtin_popcountll(e));
  return a;
}

static inline __m256i srb_emu_maskz_cvtepi64_epi32(unsigned char mask, srb_emu_m512i a) {
  int32_t r[8];
  for (int i = 0; i < 8; ++i) r[i] = (mask >> i) & 1 ? static_cast<int32_t>(a.v[i]) : 0;
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
}

#define __m512i srb_emu_m512i
#define _mm512_setzero_si512 srb_emu_setzero
#define _mm512_loadu_si512 srb_emu_loadu
#define _mm512_set1_epi64 srb_emu_set1_epi64
#define _mm512_xor_si512 srb_emu_xor
#define _mm512_add_epi64 srb_emu_add_epi64
#define _mm512_popcnt_epi64 srb_emu_popcnt_epi64
#define _mm512_maskz_cvtepi64_epi32 srb_emu_maskz_cvtepi64_epi32
