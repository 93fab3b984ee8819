// AVX-512 kernels: vpopcntq (AVX512_VPOPCNTDQ) on 8 output channels at once. Compiled with
// -mavx512f -mavx512vpopcntdq -mavx2; chosen at run time only when the CPU has these (dispatch.cc).
#include <immintrin.h>

#include "kernels.h"
#include "x86_common.h"

namespace srb {
namespace {

void pack_planar(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                 const float* threshold, uint64_t* out, ptrdiff_t unit, ptrdiff_t out_row_stride) {
  pack_planar_with<false>(x, channel_stride, channels, rows, width, threshold, out, unit, out_row_stride,
                          mask8_planar_avx2);
}

void pack_tokens(const float* x, int tokens, int channels, const float* threshold, uint64_t* out,
                 ptrdiff_t unit) {
  pack_tokens_with<false>(x, tokens, channels, threshold, out, unit, mask8_tokens_avx2);
}

// Layout: [O/8 blocks][steps][8 channels], zero-padded to a multiple of 8 channels.
size_t weight_words(int out_channels, int steps) { return size_t((out_channels + 7) / 8) * steps * 8; }

void pack_weights(const uint64_t* w, int out_channels, int steps, uint64_t* out) {
  const int blocks = (out_channels + 7) / 8;
  for (int b = 0; b < blocks; ++b)
    for (int s = 0; s < steps; ++s)
      for (int i = 0; i < 8; ++i) {
        const int o = 8 * b + i;
        out[(ptrdiff_t(b) * steps + s) * 8 + i] = o < out_channels ? w[ptrdiff_t(o) * steps + s] : 0;
      }
}

// Counts for P pixels starting at p and the 8 channels of one block, into out[P][8]. Each weight
// vector is loaded once per step and used for P pixels (broadcast words).
template <int P>
inline void block_counts(const DotTile& a, const uint64_t* w, int p, int32_t (*out)[8]) {
  const uint64_t* x = a.x + p * a.pixel_stride;
  __m512i acc[P];
  for (int i = 0; i < P; ++i) acc[i] = _mm512_setzero_si512();
  for (int s = 0; s < a.steps; ++s) {
    const __m512i ws = _mm512_loadu_si512(w + ptrdiff_t(s) * 8);
    const uint64_t* xs = x + a.x_offset[s];
    for (int i = 0; i < P; ++i) {
      const __m512i xb = _mm512_set1_epi64(static_cast<long long>(xs[i * a.pixel_stride]));
      acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(_mm512_xor_si512(ws, xb)));
    }
  }
  for (int i = 0; i < P; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i]), _mm512_maskz_cvtepi64_epi32(0xff, acc[i]));
}

void dot_tile(const DotTile& a) {
  alignas(32) int32_t block[8][8];
  for (int ob = 0; ob * 8 < a.out_channels; ++ob) {
    const uint64_t* w = a.w + ptrdiff_t(ob) * a.steps * 8;
    for (int p0 = 0; p0 < a.pixels; p0 += 8) {
      const int np = a.pixels - p0 < 8 ? a.pixels - p0 : 8;
      if (np == 8) {
        block_counts<8>(a, w, p0, block);
      } else {
        for (int j = 0; j < np; ++j) block_counts<1>(a, w, p0 + j, block + j);
      }
      store_counts_block(a, ob, p0, np, block);
    }
  }
}

}  // namespace

const Kernels kAvx512Kernels = {"avx512", 1, pack_planar, pack_tokens, weight_words, pack_weights,
                                dot_tile};

}  // namespace srb
