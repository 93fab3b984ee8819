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

// ---- fused convolution rows (ConvRow) ----
// Words of the line layout are popcounted 4 pixels at a time (one ymm) with the nibble table: per
// (4 pixels, output channel, step) vpxor, 2 vpand, vpsrlw, 2 vpshufb and 2 byte adds. AVX2 has no
// vpopcntq, so the register tile reuses each loaded activation vector over 4 output channels and each
// broadcast weight word over 8 pixels; byte counters are widened (vpsadbw) every kChunk steps.

// Lane mask (all ones) of the first `rem` of 8 32-bit lanes.
inline __m256i lane_mask(int rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Planar FP32 rows -> line layout. Groups of 8 channels, each streamed through all rows (8 input
// streams at a time); for 8 pixels, the 8 compare masks set bits c % 32 of 32-bit lanes, which are
// widened to the pixels' 64-bit words; the first group of a word stores them, the others OR them in.
void pack_lines(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                float* spatial_sum) {
  const int words = (channels + 63) / 64;
  for (int c0 = 0; c0 < channels; c0 += 8) {
    const int c1 = channels < c0 + 8 ? channels : c0 + 8, k = c0 / 64;
    const bool high = c0 % 64 >= 32, first = c0 % 64 == 0;
    for (int r = 0; r < rows; ++r) {
      uint64_t* dst = out + (ptrdiff_t(r) * words + k) * line;
      const float* src = x + ptrdiff_t(r) * width;
      float* sum_at = spatial_sum ? spatial_sum + ptrdiff_t(r) * width : nullptr;
      for (int p = 0; p < width; p += 8) {
        const bool full = width - p >= 8;
        const __m256i valid = lane_mask(width - p);
        if (p % 16 == 0)  // 1 KB ahead in each input stream, as on AVX-512; the address may lie past X
          for (int c = c0; c < c1; ++c)
            _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(src + c * channel_stride + p) + 1024),
                         _MM_HINT_T0);
        __m256 sum = _mm256_setzero_ps();
        if (sum_at && c0 > 0) sum = full ? _mm256_loadu_ps(sum_at + p) : _mm256_maskload_ps(sum_at + p, valid);
        __m256i bits = _mm256_setzero_si256(), bit = _mm256_set1_epi32(int(1u << (c0 % 32)));
        for (int c = c0; c < c1; ++c) {
          const float* in = src + c * channel_stride + p;
          const __m256 v = full ? _mm256_loadu_ps(in) : _mm256_maskload_ps(in, valid);
          if (sum_at) sum = _mm256_add_ps(sum, _mm256_mul_ps(v, _mm256_set1_ps(spatial_weight[c])));
          const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(threshold[c]), _CMP_GE_OQ));
          bits = _mm256_or_si256(bits, _mm256_and_si256(ge, bit));
          bit = _mm256_add_epi32(bit, bit);
        }
        if (!full) bits = _mm256_and_si256(bits, valid);
        __m256i lo = _mm256_cvtepu32_epi64(_mm256_castsi256_si128(bits));
        __m256i hi = _mm256_cvtepu32_epi64(_mm256_extracti128_si256(bits, 1));
        if (high) {
          lo = _mm256_slli_epi64(lo, 32);
          hi = _mm256_slli_epi64(hi, 32);
        }
        const __m256i mlo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(valid));
        const __m256i mhi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(valid, 1));
        long long* d = reinterpret_cast<long long*>(dst + p);
        if (full) {
          if (!first) {
            lo = _mm256_or_si256(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)));
            hi = _mm256_or_si256(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 4)));
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), lo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 4), hi);
          if (sum_at) _mm256_storeu_ps(sum_at + p, sum);
        } else {
          if (!first) {
            lo = _mm256_or_si256(lo, _mm256_maskload_epi64(d, mlo));
            hi = _mm256_or_si256(hi, _mm256_maskload_epi64(d + 4, mhi));
          }
          _mm256_maskstore_epi64(d, mlo, lo);
          _mm256_maskstore_epi64(d + 4, mhi, hi);
          if (sum_at) _mm256_maskstore_ps(sum_at + p, valid, sum);
        }
      }
    }
  }
}

// The epilogue's shape F: see epilogue_shape (x86_common.h); here the kMaps shapes leave the channel sums to
// the generic version.

// 8 output values of channel o at pixels p.. from their counts, in the op's fp32 order; lanes from
// p + rem on are neither loaded nor stored. `stream`: full blocks go out as streaming stores (the
// output rows are 64-byte aligned and each channel's 32 pixels are written back to back).
// Returns the values written (0 in lanes not written), for ConvRow::channel_sums.
template <int F>
inline __m256 row_epilogue(const ConvRow& a, int o, int p, int rem, __m256i counts, const float* add,
                           bool stream) {
  const bool full = rem >= 8;
  const __m256i m = lane_mask(rem);
  const auto load = [&](const float* s) { return full ? _mm256_loadu_ps(s) : _mm256_maskload_ps(s, m); };
  __m256i d = _mm256_sub_epi32(_mm256_set1_epi32(a.full), _mm256_slli_epi32(counts, 1));
  if (a.fix && (p < a.fix_lo || p + 8 > a.fix_hi)) {
    const int32_t* fix = a.fix + o * a.fix_ld + p;
    d = _mm256_add_epi32(d, full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(fix))
                                 : _mm256_maskload_epi32(reinterpret_cast<const int*>(fix), m));
  }
  __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(a.scale[o]));
  constexpr bool generic = F == kGeneric;
  if (generic ? a.spatial != nullptr : (F & kMaps) != 0) t = _mm256_mul_ps(t, load(a.spatial + p));
  if (generic ? a.channel != nullptr : (F & kMaps) != 0) t = _mm256_mul_ps(t, _mm256_set1_ps(a.channel[o]));
  if (generic ? a.bias != nullptr : (F & kBias) != 0) t = _mm256_add_ps(t, _mm256_set1_ps(a.bias[o]));
  if (generic && a.skip) t = _mm256_add_ps(t, load(static_cast<const float*>(a.skip) + o * a.plane + p));
  if (generic && a.residual) t = _mm256_add_ps(t, load(static_cast<const float*>(a.residual) + o * a.plane + p));
  if (!generic && (F & kAdd)) t = _mm256_add_ps(t, load(add + o * a.plane + p));
  if (generic ? a.relu : (F & kRelu) != 0)
    t = _mm256_max_ps(_mm256_setzero_ps(), t);  // NaN stays NaN (max returns its second operand)
  if (generic ? a.slope != nullptr : (F & kPrelu) != 0)
    t = _mm256_blendv_ps(t, _mm256_mul_ps(t, _mm256_set1_ps(a.slope[o])),
                         _mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_LT_OQ));
  float* out = static_cast<float*>(a.y) + o * a.plane + p;
  if (!full) {
    _mm256_maskstore_ps(out, m, t);
    return _mm256_and_ps(t, _mm256_castsi256_ps(m));
  }
  if (stream) {
    _mm256_stream_ps(out, t);
  } else {
    _mm256_storeu_ps(out, t);
  }
  return t;
}

constexpr int kChunk = 31;  // steps per byte counter: each adds <= 8, 31 * 8 <= 255

// popcount of every byte of v.
inline __m256i popcount_bytes(__m256i v, __m256i lut, __m256i low) {
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
}

// 64-bit counts of pixels 0..3 and 4..7 -> 8 int32 counts in pixel order.
inline __m256i narrow_counts(__m256i c0, __m256i c1) {
  const __m256i mixed = _mm256_or_si256(c0, _mm256_slli_epi64(c1, 32));  // p0 p4 p1 p5 p2 p6 p3 p7
  return _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

constexpr int kMaxSplitSteps = 64;  // steps of a chunk held split in nibbles (32 KB of stack)

// Counts of 8 pixels x 4 output channels into out[oc][0..7] from the chunk's words split in nibbles:
// xlo / xhi [steps][32] (word & 0x0f.., (word >> 4) & 0x0f..), wlo / whi [4][steps]. The xor of two
// split words is the split xor, so a popcount is 2 vpxor, 2 vpshufb, 2 byte adds (vs 8 ops unsplit);
// per step 4 pairs of broadcast weight words meet 2 pairs of activation vectors (memory operands),
// with 8 byte accumulators in registers.
template <int S>
inline void quad_counts_split(int steps, const uint64_t* xlo, const uint64_t* xhi, const uint64_t* wlo,
                              const uint64_t* whi, int32_t* out, ptrdiff_t ld) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i zero = _mm256_setzero_si256();
  if (S) steps = S;
  __m256i total[4][2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) total[i / 2][i % 2] = zero;
  for (int s0 = 0; s0 < steps; s0 += kChunk) {
    const int s1 = steps - s0 < kChunk ? steps : s0 + kChunk;
    __m256i acc[4][2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i / 2][i % 2] = zero;
#pragma GCC unroll 1
    for (int s = s0; s < s1; ++s) {
      const __m256i* xl = reinterpret_cast<const __m256i*>(xlo + s * 32);
      const __m256i* xh = reinterpret_cast<const __m256i*>(xhi + s * 32);
#pragma GCC unroll 4
      for (int oc = 0; oc < 4; ++oc) {
        const __m256i wl = _mm256_set1_epi64x(static_cast<long long>(wlo[oc * steps + s]));
        const __m256i wh = _mm256_set1_epi64x(static_cast<long long>(whi[oc * steps + s]));
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v) {
          const __m256i l = _mm256_shuffle_epi8(lut, _mm256_xor_si256(_mm256_load_si256(xl + v), wl));
          const __m256i h = _mm256_shuffle_epi8(lut, _mm256_xor_si256(_mm256_load_si256(xh + v), wh));
          acc[oc][v] = _mm256_add_epi8(acc[oc][v], _mm256_add_epi8(l, h));
          asm("" : "+x"(acc[oc][v]));  // keeps the accumulator in a register (GCC 12 spilled some)
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      total[i / 2][i % 2] = _mm256_add_epi64(total[i / 2][i % 2], _mm256_sad_epu8(acc[i / 2][i % 2], zero));
  }
#pragma GCC unroll 4
  for (int oc = 0; oc < 4; ++oc)
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + oc * ld), narrow_counts(total[oc][0], total[oc][1]));
}

// Counts of 8 pixels from x x 4 output channels (weights w, [4][steps]) into out[oc][0..7], the words
// split in registers: for windows of more than kMaxSplitSteps steps.
inline void quad_counts(const ConvRow& a, const uint64_t* x, const uint64_t* w, int32_t* out, ptrdiff_t ld) {
  const int steps = a.steps;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  __m256i total[4][2];
  for (int i = 0; i < 8; ++i) total[i / 2][i % 2] = zero;
  for (int s0 = 0; s0 < steps; s0 += kChunk) {
    const int s1 = steps - s0 < kChunk ? steps : s0 + kChunk;
    __m256i acc[4][2];
    for (int i = 0; i < 8; ++i) acc[i / 2][i % 2] = zero;
#pragma GCC unroll 1
    for (int s = s0; s < s1; ++s) {
      const uint64_t* xs = x + a.offset[s];
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + 4));
      for (int oc = 0; oc < 4; ++oc) {
        const __m256i wb = _mm256_set1_epi64x(static_cast<long long>(w[oc * steps + s]));
        acc[oc][0] = _mm256_add_epi8(acc[oc][0], popcount_bytes(_mm256_xor_si256(x0, wb), lut, low));
        acc[oc][1] = _mm256_add_epi8(acc[oc][1], popcount_bytes(_mm256_xor_si256(x1, wb), lut, low));
      }
    }
    for (int i = 0; i < 8; ++i)
      total[i / 2][i % 2] = _mm256_add_epi64(total[i / 2][i % 2], _mm256_sad_epu8(acc[i / 2][i % 2], zero));
  }
  for (int oc = 0; oc < 4; ++oc)
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + oc * ld), narrow_counts(total[oc][0], total[oc][1]));
}

// n words (n % 4 == 0) -> their low and high nibbles.
inline void split_words(const uint64_t* w, int n, uint64_t* lo, uint64_t* hi) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int i = 0; i < n; i += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lo + i), _mm256_and_si256(v, low));
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi + i), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  }
}

// A row in chunks of 32 pixels: per chunk its steps' words split in nibbles once, then per quad of
// output channels (its weights split) the counts of the chunk's (up to) 4 groups of 8 pixels, then the
// epilogue of each channel over the chunk. S: the number of steps when known at compile time (0:
// a.steps); F: the epilogue's shape.
template <int F, int S>
void row_tiles(const ConvRow& a, const float* add) {
  const bool stream = ((reinterpret_cast<uintptr_t>(a.y) | uintptr_t(a.plane * 4)) & 63) == 0;
  const int steps = S ? S : a.steps;
  const bool split = steps <= kMaxSplitSteps;
  const int chunks = (a.width + 31) / 32;
  const int per_chunk = (a.prefetch_rows + chunks - 1) / chunks;  // prefetched rows per chunk
  alignas(32) int32_t counts[4][32];
  alignas(32) uint64_t xlo[kMaxSplitSteps * 32], xhi[kMaxSplitSteps * 32];
  alignas(32) uint64_t wlo[4 * kMaxSplitSteps], whi[4 * kMaxSplitSteps];
  for (int p = 0, t = 0; p < a.width; p += 32, ++t) {
    const int np = a.width - p < 32 ? a.width - p : 32, groups = (np + 7) / 8;
    if (a.prefetch) {
      const int r1 = a.prefetch_rows < (t + 1) * per_chunk ? a.prefetch_rows : (t + 1) * per_chunk;
      for (int r = t * per_chunk; r < r1; ++r)
        for (int q = 0; q < a.prefetch_bytes; q += 64)
          _mm_prefetch(a.prefetch + r * a.prefetch_stride + q, _MM_HINT_T1);
    }
    if (split)
      for (int s = 0; s < steps; ++s) split_words(a.x + a.offset[s] + p, 32, xlo + s * 32, xhi + s * 32);
    for (int o0 = 0; o0 < a.out_channels; o0 += 4) {
      const uint64_t* w = a.w + ptrdiff_t(o0) * steps;
      if (split) {
        split_words(w, 4 * steps, wlo, whi);
        for (int g = 0; g < groups; ++g)
          quad_counts_split<S>(steps, xlo + 8 * g, xhi + 8 * g, wlo, whi, counts[0] + 8 * g, 32);
      } else {
        for (int g = 0; g < groups; ++g) quad_counts(a, a.x + p + 8 * g, w, counts[0] + 8 * g, 32);
      }
      for (int oc = 0; oc < 4 && o0 + oc < a.out_channels; ++oc) {
        const int o = o0 + oc;
        __m256 sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int g = 0; g < groups; ++g) {
          const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(counts[oc] + 8 * g));
          const __m256 v = row_epilogue<F>(a, o, p + 8 * g, np - 8 * g, c, add, stream);
          // Lane l of 16 sums pixels l, l + 16 of the chunk: the AVX-512 rows' order.
          if (F == kGeneric && a.channel_sums) sum[g % 2] = _mm256_add_ps(sum[g % 2], v);
        }
        if (F == kGeneric && a.channel_sums) {
          float* sums = a.channel_sums + o * 16;
          _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_loadu_ps(sums), sum[0]));
          _mm256_storeu_ps(sums + 8, _mm256_add_ps(_mm256_loadu_ps(sums + 8), sum[1]));
        }
      }
    }
  }
}

// The step count known at compile time for 3x3 windows of 64 channels (9) and concatenated windows of
// 48 (7) and 50 or 52 channels (8), the common cases.
template <int F>
void row_tiles_steps(const ConvRow& a, const float* add) {
  switch (a.steps) {
    case 9: row_tiles<F, 9>(a, add); break;
    case 8: row_tiles<F, 8>(a, add); break;
    case 7: row_tiles<F, 7>(a, add); break;
    default: row_tiles<F, 0>(a, add);
  }
}

// ConvRow::window from the line buffer (as on AVX-512, 4 pixels at a time): word s is the OR of the
// tap words overlapping bits 64 s .. 64 s + 63 of the concatenation, each shifted into place.
void build_windows(const ConvRow& a) {
  const int end = (a.width + 31) / 32 * 32;
  const uint64_t* src[kMaxWindowOverlap];
  __m128i left[kMaxWindowOverlap], right;
  for (int s = 0; s < a.steps; ++s) {
    const int n = window_taps(a, s, src, left, &right);
    uint64_t* out = a.window + s * a.line;
    for (int q = 0; q < end; q += 4) {
      __m256i word = _mm256_srl_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[0] + q)), right);
      for (int j = 1; j < n; ++j)
        word = _mm256_or_si256(
            word, _mm256_sll_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[j] + q)), left[j]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q), word);
    }
  }
}

// exp(x) for 8 lanes, the AVX-512 rows' method: 2^n * e^f with n = round(x / ln 2), f = x - n ln 2
// (two-part ln 2), e^f by its degree-6 Taylor polynomial; 2^n as two factors 2^(n/2) (n clamped to
// [-252, 254]), so that under- and overflow give 0 and inf as scalef does.
inline __m256 exp8(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693145751953125f)));
  f = _mm256_sub_ps(f, _mm256_mul_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f)));
  static const float coefficients[6] = {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : coefficients) p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(c));
  const __m256i ni =
      _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(n, _mm256_set1_ps(254.f)), _mm256_set1_ps(-252.f)));
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// spatial_row[p] = 1 / (1 + exp(-(spatial_sum[p] + bias))).
void spatial_row(const ConvRow& a) {
  for (int p = 0; p < a.width; p += 8) {
    const __m256i m = lane_mask(a.width - p);
    const __m256 t = _mm256_add_ps(_mm256_maskload_ps(a.spatial_sum + p, m), _mm256_set1_ps(a.spatial_bias));
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), t));
    _mm256_storeu_ps(a.spatial_row + p, _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e)));
  }
}

void conv_row(const ConvRow& row) {
  const ConvRow a = prepared_row(row, spatial_row, build_windows);
  const float* add = static_cast<const float*>(a.skip ? a.skip : a.residual);
  with_epilogue_shape(epilogue_shape(a, false),
                      [&](auto shape) { row_tiles_steps<decltype(shape)::value>(a, add); });
  _mm_sfence();  // the streaming stores are visible before the row's task ends
}

}  // namespace

const Kernels kAvx2Kernels = {"avx2", 2, pack_planar, pack_tokens, weight_words, pack_weights,
                              dot_tile, pack_lines, conv_row, nullptr};

}  // namespace srb
