// Portable scalar kernels: plain C++, no instruction-set flags (see kernels.h).
#include "kernels.h"

namespace srb {
namespace {

unsigned mask8_planar(const float* x, float t) { return threshold_bits(x, 1, 8, t); }

unsigned mask8_tokens(const float* x, const float* t) {
  unsigned m = 0;
  for (int i = 0; i < 8; ++i) m |= unsigned(x[i] >= t[i]) << i;
  return m;
}

void pack_planar(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                 const float* threshold, uint64_t* out, ptrdiff_t unit, ptrdiff_t out_row_stride) {
  pack_planar_with<false>(x, channel_stride, channels, rows, width, threshold, out, unit, out_row_stride,
                          mask8_planar);
}

void pack_tokens(const float* x, int tokens, int channels, const float* threshold, uint64_t* out,
                 ptrdiff_t unit) {
  pack_tokens_with<false>(x, tokens, channels, threshold, out, unit, mask8_tokens);
}

// Layout: unchanged, [O][steps].
size_t weight_words(int out_channels, int steps) { return size_t(out_channels) * steps; }

void pack_weights(const uint64_t* w, int out_channels, int steps, uint64_t* out) {
  for (size_t i = 0; i < size_t(out_channels) * steps; ++i) out[i] = w[i];
}

// Branch-free bit-slicing popcount: without -mpopcnt, __builtin_popcountll is a libgcc call.
inline int32_t popcount64(uint64_t v) {
  v -= (v >> 1) & 0x5555555555555555ULL;
  v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
  v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
  return int32_t((v * 0x0101010101010101ULL) >> 56);
}

void dot_tile(const DotTile& a) {
  for (int p = 0; p < a.pixels; ++p) {
    const uint64_t* x = a.x + p * a.pixel_stride;
    for (int o = 0; o < a.out_channels; ++o) {
      const uint64_t* w = a.w + ptrdiff_t(o) * a.steps;
      int32_t sum = 0;
      for (int s = 0; s < a.steps; ++s) sum += popcount64(x[a.x_offset[s]] ^ w[s]);
      a.counts[a.pixel_major ? p * a.ld + o : o * a.ld + p] = sum;
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {"scalar", 1, pack_planar, pack_tokens, weight_words, pack_weights,
                                dot_tile, nullptr, nullptr, nullptr};

}  // namespace srb
