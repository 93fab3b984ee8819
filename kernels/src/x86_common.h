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

// ---- the epilogue shape of a conv row, a compile-time parameter of both ISAs' row code ----

// kGeneric: every optional input tested at run time; any other value is a set of these flags (at most one
// of skip and residual, read through one pointer; kMaps: both the spatial map and the channel scale, as in
// SCALES' binary convs, without PReLU). Testing the optional inputs per output vector took about a sixth
// of a plain 64->64 conv's row time on AVX-512: the common shapes get their own code.
constexpr int kGeneric = -1, kBias = 1, kAdd = 2, kRelu = 4, kPrelu = 8, kMaps = 16;

namespace {
template <int F>
struct EpilogueShape {
  static constexpr int value = F;
};
}  // namespace

// The shape for `a`. `sums_with_maps`: whether the kMaps shapes add the channel sums (else the sums make
// the row generic, as without maps).
static inline int epilogue_shape(const ConvRow& a, bool sums_with_maps) {
  const bool maps = a.spatial && a.channel;
  const bool generic = (a.skip && a.residual) || (maps ? a.slope || (a.channel_sums && !sums_with_maps)
                                                       : a.spatial || a.channel || a.channel_sums);
  return generic ? kGeneric
                 : (a.bias ? kBias : 0) | (a.skip || a.residual ? kAdd : 0) | (a.relu ? kRelu : 0) |
                       (a.slope ? kPrelu : 0) | (maps ? kMaps : 0);
}

// Calls fn(EpilogueShape<F>{}) for F = shape: one instantiation of the caller's row code per shape.
template <class Fn>
static inline void with_epilogue_shape(int shape, Fn&& fn) {
  switch (shape) {
    case 0: fn(EpilogueShape<0>{}); break;
    case kBias: fn(EpilogueShape<kBias>{}); break;
    case kAdd: fn(EpilogueShape<kAdd>{}); break;
    case kBias | kAdd: fn(EpilogueShape<kBias | kAdd>{}); break;
    case kRelu: fn(EpilogueShape<kRelu>{}); break;
    case kBias | kRelu: fn(EpilogueShape<kBias | kRelu>{}); break;
    case kAdd | kRelu: fn(EpilogueShape<kAdd | kRelu>{}); break;
    case kBias | kAdd | kRelu: fn(EpilogueShape<kBias | kAdd | kRelu>{}); break;
    case kPrelu: fn(EpilogueShape<kPrelu>{}); break;
    case kBias | kPrelu: fn(EpilogueShape<kBias | kPrelu>{}); break;
    case kAdd | kPrelu: fn(EpilogueShape<kAdd | kPrelu>{}); break;
    case kBias | kAdd | kPrelu: fn(EpilogueShape<kBias | kAdd | kPrelu>{}); break;
    case kMaps: fn(EpilogueShape<kMaps>{}); break;
    case kMaps | kBias: fn(EpilogueShape<kMaps | kBias>{}); break;
    case kMaps | kAdd: fn(EpilogueShape<kMaps | kAdd>{}); break;
    case kMaps | kBias | kAdd: fn(EpilogueShape<kMaps | kBias | kAdd>{}); break;
    case kMaps | kRelu: fn(EpilogueShape<kMaps | kRelu>{}); break;
    case kMaps | kBias | kRelu: fn(EpilogueShape<kMaps | kBias | kRelu>{}); break;
    case kMaps | kAdd | kRelu: fn(EpilogueShape<kMaps | kAdd | kRelu>{}); break;
    case kMaps | kBias | kAdd | kRelu: fn(EpilogueShape<kMaps | kBias | kAdd | kRelu>{}); break;
    default: fn(EpilogueShape<kGeneric>{});
  }
}

// The row as the tiles read it: the spatial map computed into spatial_row and the concatenated windows built
// (by this ISA's functions) where the row asks for them.
template <class SpatialRow, class BuildWindows>
static inline ConvRow prepared_row(const ConvRow& row, SpatialRow spatial_row, BuildWindows build_windows) {
  ConvRow a = row;
  if (row.spatial_sum) {
    spatial_row(row);
    a.spatial = row.spatial_row;
  }
  if (row.concat_channels) {
    build_windows(row);
    a.x = row.window;
  }
  return a;
}

}  // namespace srb
