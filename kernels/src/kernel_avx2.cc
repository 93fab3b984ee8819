// AVX2 kernels: popcount through a 16-entry nibble lookup table (vpshufb). Compiled with -mavx2.
//
// Activations and weights are stored pre-split into low and high nibbles (words_per_word = 2), so
// popcount(x ^ w) costs one xor, one vpshufb and one byte add per 2 output channels: a 256-bit weight
// vector holds [lo, hi] of one word for output channels o (low 128-bit lane) and o + 4 (high lane),
// and the pixel's [lo, hi] is broadcast to both lanes. Byte counters are widened every 63 steps.
#include <immintrin.h>

#include "kernels.h"
#include "x86_common.h"

namespace srb {
namespace {

constexpr uint64_t kLowNibbles = 0x0f0f0f0f0f0f0f0fULL;
constexpr int kMaxByteSteps = 63;  // each step adds <= 4 to a byte counter: 63 * 4 <= 255

void pack_planar(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                 const float* threshold, uint64_t* out, ptrdiff_t unit, ptrdiff_t out_row_stride) {
  pack_planar_with<true>(x, channel_stride, channels, rows, width, threshold, out, unit, out_row_stride,
                          mask8_planar_avx2);
}

void pack_tokens(const float* x, int tokens, int channels, const float* threshold, uint64_t* out,
                 ptrdiff_t unit) {
  pack_tokens_with<true>(x, tokens, channels, threshold, out, unit, mask8_tokens_avx2);
}

// Layout: [O/8 blocks][steps][pair q < 4][lo(o), hi(o), lo(o + 4), hi(o + 4)] with o = 8 * block + q.
size_t weight_words(int out_channels, int steps) {
  return size_t((out_channels + 7) / 8) * steps * 16;
}

void pack_weights(const uint64_t* w, int out_channels, int steps, uint64_t* out) {
  const int blocks = (out_channels + 7) / 8;
  for (int b = 0; b < blocks; ++b)
    for (int s = 0; s < steps; ++s)
      for (int i = 0; i < 8; ++i) {
        const int o = 8 * b + i;
        const uint64_t word = o < out_channels ? w[ptrdiff_t(o) * steps + s] : 0;
        uint64_t* dst = out + ((ptrdiff_t(b) * steps + s) * 4 + i % 4) * 4 + 2 * (i / 4);
        dst[0] = word & kLowNibbles;
        dst[1] = (word >> 4) & kLowNibbles;
      }
}

// Byte counters of 4 pairs -> the 8 channel counts [o0..o7] as 32-bit lanes.
inline __m256i reduce_pairs(const __m256i* acc) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i s[4];
  for (int q = 0; q < 4; ++q) s[q] = _mm256_sad_epu8(acc[q], zero);  // [lo, hi | lo', hi'] 64-bit
  // Each 64-bit sum is < 2^16, so adding adjacent 32-bit halves twice leaves [o0..o3 | o4..o7].
  return _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
}

// Counts of one pixel p for the 8 channels of one block, into out[8]. One pixel at a time keeps
// the 4 accumulators, the broadcast pixel and the table in registers; the weights come from L1.
inline void block_counts(const DotTile& a, const uint64_t* w, int p, int32_t* out) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const uint64_t* x = a.x + p * a.pixel_stride;
  __m256i total = _mm256_setzero_si256();
  for (int s0 = 0; s0 < a.steps; s0 += kMaxByteSteps) {
    const int s1 = a.steps - s0 < kMaxByteSteps ? a.steps : s0 + kMaxByteSteps;
    __m256i acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_si256();
    for (int s = s0; s < s1; ++s) {
      const __m256i xb =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + a.x_offset[s])));
      const __m256i* ws = reinterpret_cast<const __m256i*>(w + ptrdiff_t(s) * 16);
      for (int q = 0; q < 4; ++q)
        acc[q] = _mm256_add_epi8(acc[q], _mm256_shuffle_epi8(lut, _mm256_xor_si256(xb, _mm256_loadu_si256(ws + q))));
    }
    total = _mm256_add_epi32(total, reduce_pairs(acc));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), total);
}

void dot_tile(const DotTile& a) {
  alignas(32) int32_t block[8][8];
  for (int ob = 0; ob * 8 < a.out_channels; ++ob) {
    const uint64_t* w = a.w + ptrdiff_t(ob) * a.steps * 16;
    for (int p0 = 0; p0 < a.pixels; p0 += 8) {
      const int np = a.pixels - p0 < 8 ? a.pixels - p0 : 8;
      for (int j = 0; j < np; ++j) block_counts(a, w, p0 + j, block[j]);
      store_counts_block(a, ob, p0, np, block);
    }
  }
}

}  // namespace

const Kernels kAvx2Kernels = {"avx2", 2, pack_planar, pack_tokens, weight_words, pack_weights,
                              dot_tile, nullptr, nullptr};

}  // namespace srb
