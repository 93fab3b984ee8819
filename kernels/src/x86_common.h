// AVX2 helpers shared by the AVX2 and AVX-512 kernels (static; compiled with each file's flags).
#pragma once

#include <immintrin.h>

#include "kernels.h"

namespace srb {

static inline unsigned mask8_planar_avx2(const float* x, float t) {
  return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), _mm256_set1_ps(t), _CMP_GE_OQ)));
}

static inline unsigned mask8_tokens_avx2(const float* x, const float* t) {
  return unsigned(
      _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(t), _CMP_GE_OQ)));
}

// Writes block[j][i] = count of pixel p0+j, channel 8*ob+i (j < np) to the tile's counts.
static inline void store_counts_block(const DotTile& a, int ob, int p0, int np,
                                      const int32_t (*block)[8]) {
  if (a.pixel_major) {
    for (int j = 0; j < np; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.counts + (p0 + j) * a.ld + 8 * ob),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block[j])));
    return;
  }
  int32_t* out = a.counts + 8 * ob * a.ld + p0;
  if (np < 8) {
    for (int j = 0; j < np; ++j)
      for (int i = 0; i < 8; ++i) out[i * a.ld + j] = block[j][i];
    return;
  }
  // 8x8 transpose of 32-bit elements: unpack pairs, then quads, then swap 128-bit halves.
  __m256i r[8], t[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block[j]));
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    r[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
    r[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
    r[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
    r[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * a.ld),
                        _mm256_permute2x128_si256(r[i], r[i + 4], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (i + 4) * a.ld),
                        _mm256_permute2x128_si256(r[i], r[i + 4], 0x31));
  }
}

// The taps of a concatenated window (ConvRow::concat_channels) that overlap its word s, bits 64 s .. 64 s + 63:
// where each is read in the line buffer, how far left it is shifted, and (returned through `right`) how far
// right the first one is; returns how many. Worked out once per word, outside the loops over pixels.
constexpr int kMaxWindowOverlap = 65;  // a word overlaps at most 64 / C + 1 taps

static inline int window_taps(const ConvRow& a, int s, const uint64_t** src, __m128i* left, __m128i* right) {
  const int C = a.concat_channels, taps = a.kh * a.kw, b0 = 64 * s;
  const int t0 = b0 / C, t1 = (b0 + 63) / C + 1 < taps ? (b0 + 63) / C + 1 : taps;  // taps overlapping
  for (int j = 0; j < t1 - t0; ++j) {
    const int t = t0 + j, shift = t * C - b0;  // >= 0 except for the first tap
    src[j] = a.x + (t / a.kw) * a.line + t % a.kw;
    left[j] = _mm_cvtsi32_si128(shift > 0 ? shift : 0);
  }
  *right = _mm_cvtsi32_si128(b0 - t0 * C);  // the first tap's bits below b0
  return t1 - t0;
}

}  // namespace srb
