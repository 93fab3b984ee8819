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

#ifndef _mm512_popcnt_epi64  // the real instructions (the emulated test build leaves the fused path out)
// GCC 12's own AVX-512 headers trip -W(maybe-)uninitialized (their `__Y = __Y` idiom) once inlined here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// ---- fused convolution rows (ConvRow) ----

// 16 activations from i on (float, or float16 when H), lanes outside m read as 0. Without AVX512BW a
// partial float16 vector goes through a small buffer.
template <bool H>
inline __m512 load16(const void* base, ptrdiff_t i, __mmask16 m) {
  if (!H) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  const uint16_t* src = static_cast<const uint16_t*>(base) + i;
  if (m == 0xffff) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  alignas(32) uint16_t part[16] = {};
  for (int l = 0; l < 16; ++l)
    if (m >> l & 1) part[l] = src[l];
  return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(part)));
}

// Stores the lanes of v in m at element i (float, or float16 rounded to nearest even when H). `stream`:
// full vectors with a streaming store.
template <bool H>
inline void store16(void* base, ptrdiff_t i, __m512 v, __mmask16 m, bool stream) {
  if (!H) {
    float* out = static_cast<float*>(base) + i;
    if (stream && m == 0xffff) {
      _mm512_stream_ps(out, v);
    } else {
      _mm512_mask_storeu_ps(out, m, v);
    }
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(base) + i;
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (m == 0xffff) {
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(out), h);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
    }
    return;
  }
  alignas(32) uint16_t part[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(part), h);
  for (int l = 0; l < 16; ++l)
    if (m >> l & 1) out[l] = part[l];
}

// One block of 16 pixels (lanes in `valid`) of N channels (N = 0: n of them) from x + i on, channel c at
// c * channel_stride: where channel c passes t[c], bit[c] is set in its pixel's word (lo: pixels 0-7, hi:
// 8-15); with kSum, sum += w[c] * x, in channel order.
template <bool H, bool kSum, int N>
inline void pack_block(const void* x, ptrdiff_t channel_stride, ptrdiff_t i, __mmask16 valid, int n,
                       const __m512* t, const __m512i* bit, const __m512* w, __m512i& lo, __m512i& hi,
                       __m512& sum) {
#pragma GCC unroll 8
  for (int c = 0; c < (N ? N : n); ++c) {
    const __m512 v = load16<H>(x, c * channel_stride + i, valid);
    if (kSum) sum = _mm512_add_ps(sum, _mm512_mul_ps(v, w[c]));
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, v, t[c], _CMP_GE_OQ);
    lo = _mm512_mask_or_epi64(lo, __mmask8(m), lo, bit[c]);
    hi = _mm512_mask_or_epi64(hi, __mmask8(m >> 8), hi, bit[c]);
  }
}

// Planar rows (float, or float16 when H) -> line layout. Groups of 8 channels, each streamed through all
// rows (8 input streams at a time), their thresholds, bits and spatial weights held in registers; for 16
// pixels, each channel's compare mask sets its bit in the 16 words (8 per register) of its word, which the
// first group of a word stores and the others update. kSum: also the spatial sums.
template <bool H, bool kSum>
void pack_lines_as(const void* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                   const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                   float* spatial_sum) {
  constexpr int kBytes = H ? 2 : 4;
  const int words = (channels + 63) / 64;
  for (int c0 = 0; c0 < channels; c0 += 8) {
    const int n = channels - c0 < 8 ? channels - c0 : 8, k = c0 / 64;
    const char* group = static_cast<const char*>(x) + c0 * channel_stride * kBytes;
    __m512 t[8], w[8];
    __m512i bit[8];
    for (int c = 0; c < 8; ++c) {
      const int cc = c0 + (c < n ? c : 0);
      t[c] = _mm512_set1_ps(threshold[cc]);
      w[c] = _mm512_set1_ps(kSum ? spatial_weight[cc] : 0.f);
      bit[c] = _mm512_set1_epi64(static_cast<long long>(1ULL << ((c0 + c) % 64)));
    }
    for (int r = 0; r < rows; ++r) {
      uint64_t* dst = out + (ptrdiff_t(r) * words + k) * line;
      const ptrdiff_t row = ptrdiff_t(r) * width;
      for (int p = 0; p < width; p += 16) {
        const int np = width - p < 16 ? width - p : 16;
        const __mmask16 valid = np == 16 ? __mmask16(0xffff) : __mmask16((1u << np) - 1);
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        if (c0 % 64) {
          lo = _mm512_maskz_loadu_epi64(__mmask8(valid), dst + p);
          hi = _mm512_maskz_loadu_epi64(__mmask8(valid >> 8), dst + p + 8);
        }
        // Prefetch 1 KB ahead in each of the 8 input streams: packing a 64-channel 256x256 image from
        // DRAM took a third less time on Zen 5. Integer arithmetic: the address may lie past X.
        for (int c = 0; c < n; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(
                           group + (c * channel_stride + row + p) * kBytes) + 1024),
                       _MM_HINT_T0);
        float* sum_at = kSum ? spatial_sum + row + p : nullptr;
        __m512 sum = c0 == 0 || !kSum ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(valid, sum_at);
        if (np == 16 && n == 8) {
          pack_block<H, kSum, 8>(group, channel_stride, row + p, 0xffff, 8, t, bit, w, lo, hi, sum);
        } else {
          pack_block<H, kSum, 0>(group, channel_stride, row + p, valid, n, t, bit, w, lo, hi, sum);
        }
        _mm512_mask_storeu_epi64(dst + p, __mmask8(valid), lo);
        _mm512_mask_storeu_epi64(dst + p + 8, __mmask8(valid >> 8), hi);
        if (kSum) _mm512_mask_storeu_ps(sum_at, valid, sum);
      }
    }
  }
}

template <bool H>
void pack_lines_any(const void* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                    const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                    float* spatial_sum) {
  if (spatial_sum) {
    pack_lines_as<H, true>(x, channel_stride, channels, rows, width, threshold, out, line, spatial_weight, spatial_sum);
  } else {
    pack_lines_as<H, false>(x, channel_stride, channels, rows, width, threshold, out, line, nullptr, nullptr);
  }
}

void pack_lines(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                float* spatial_sum) {
  pack_lines_any<false>(x, channel_stride, channels, rows, width, threshold, out, line, spatial_weight, spatial_sum);
}

void pack_lines_half(const uint16_t* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                     const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                     float* spatial_sum) {
  pack_lines_any<true>(x, channel_stride, channels, rows, width, threshold, out, line, spatial_weight, spatial_sum);
}

// Lane mask of the first `rem` of 16 lanes (rem may be <= 0 or >= 16).
inline __mmask16 lanes(int rem) {
  return rem >= 16 ? __mmask16(0xffff) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
}

// The epilogue's shape F: see epilogue_shape (x86_common.h); the kMaps shapes add the channel sums too.

// 16 output values of channel o from two 8-pixel count vectors, in the op's fp32 order; lanes from
// pixel p + rem on are neither loaded nor stored. `add`: the skip or residual plane (F & kAdd). H: the
// activations are float16. `stream`: the output rows are 64-byte aligned, so full blocks are written with
// streaming stores (the output is not read back here: no read-for-ownership of its lines).
// Returns the fp32 values (0 in lanes not written), for ConvRow::channel_sums. kInner: all 16 lanes, and no
// border correction.
template <int F, bool H, bool kInner>
inline __m512 row_epilogue(const ConvRow& a, int o, int p, int rem, __m512i c0, __m512i c1, const void* add,
                           bool stream) {
  const __mmask16 m = kInner ? __mmask16(0xffff) : lanes(rem);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i counts = _mm512_permutex2var_epi32(c0, evens, c1);  // the low halves of the 64-bit counts
  __m512i d = _mm512_sub_epi32(_mm512_set1_epi32(a.full), _mm512_slli_epi32(counts, 1));
  if (!kInner && a.fix && (p < a.fix_lo || p + 16 > a.fix_hi))
    d = _mm512_add_epi32(d, _mm512_maskz_loadu_epi32(m, a.fix + o * a.fix_ld + p));
  __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(a.scale[o]));
  constexpr bool generic = F == kGeneric;
  const ptrdiff_t at = o * a.plane + p;
  if (generic ? a.spatial != nullptr : (F & kMaps) != 0) t = _mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, a.spatial + p));
  if (generic ? a.channel != nullptr : (F & kMaps) != 0) t = _mm512_mul_ps(t, _mm512_set1_ps(a.channel[o]));
  if (generic ? a.bias != nullptr : (F & kBias) != 0) t = _mm512_add_ps(t, _mm512_set1_ps(a.bias[o]));
  if (generic && a.skip) t = _mm512_add_ps(t, load16<H>(a.skip, at, m));
  if (generic && a.residual) t = _mm512_add_ps(t, load16<H>(a.residual, at, m));
  if (!generic && (F & kAdd)) t = _mm512_add_ps(t, load16<H>(add, at, m));
  if (generic ? a.relu : (F & kRelu) != 0)
    t = _mm512_max_ps(_mm512_setzero_ps(), t);  // NaN stays NaN (max returns its second operand)
  if (generic ? a.slope != nullptr : (F & kPrelu) != 0)
    t = _mm512_mask_mul_ps(t, _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_LT_OQ), t, _mm512_set1_ps(a.slope[o]));
  store16<H>(a.y, at, t, m, stream);
  return _mm512_maskz_mov_ps(m, t);
}

// 8 * V pixels from p x 4 output channels at a time: per step V input vectors and 4 broadcast weight
// words feed 4 * V accumulators (vpopcntq on 8 pixels each), which stay in registers. S: the number
// of steps when known at compile time (0: a.steps); F: the epilogue's shape; kInner: a full tile clear of the
// border corrections.
template <int F, bool H, int S, int V, bool kInner>
inline void row_tile(const ConvRow& row, int p, int np, const void* add, bool stream) {
  // A local copy: its fields stay in registers, where the stores (which may alias anything) would make the
  // compiler reload each of them from `row` after every output vector.
  const ConvRow a = row;
  const int steps = S ? S : a.steps;
  const uint64_t* x = a.x + p;
  for (int o0 = 0; o0 < a.out_channels; o0 += 4) {
    __m512i acc[4][V];
#pragma GCC unroll 16
    for (int i = 0; i < 4 * V; ++i) acc[i / V][i % V] = _mm512_setzero_si512();
    const uint64_t* w = a.w + ptrdiff_t(o0) * steps;
    for (int s = 0; s < steps; ++s) {
      const uint64_t* xs = x + a.offset[s];
      __m512i xv[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_si512(xs + 8 * v);
#pragma GCC unroll 4
      for (int oc = 0; oc < 4; ++oc) {
        const __m512i wb = _mm512_set1_epi64(static_cast<long long>(w[oc * steps + s]));
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v)
          acc[oc][v] = _mm512_add_epi64(acc[oc][v], _mm512_popcnt_epi64(_mm512_xor_si512(xv[v], wb)));
      }
    }
#pragma GCC unroll 4
    for (int oc = 0; oc < 4; ++oc) {
      if (o0 + oc >= a.out_channels) break;
      __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 2
      for (int v = 0; v < V; v += 2) {
        const __m512 t = row_epilogue<F, H, kInner>(a, o0 + oc, p + 8 * v, np - 8 * v, acc[oc][v], acc[oc][v + 1], add, stream);
        if (F == kGeneric ? a.channel_sums != nullptr : (F & kMaps) != 0) sum = _mm512_add_ps(sum, t);
      }
      if ((F == kGeneric || (F & kMaps)) && a.channel_sums) {
        float* sums = a.channel_sums + (o0 + oc) * 16;
        _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), sum));
      }
    }
  }
}

// A row in tiles of 32 pixels (the last one 16 when no more remain). Float16 rows are streamed only when
// the caller says Y is too large to stay in the cache for the next op (ConvRow::stream_half).
template <int F, bool H, int S>
void row_tiles(const ConvRow& a, const void* add) {
  const bool aligned = ((reinterpret_cast<uintptr_t>(a.y) | uintptr_t(a.plane * (H ? 2 : 4))) & 63) == 0;
  const bool stream = aligned && (!H || a.stream_half);
  const int tiles = (a.width + 31) / 32;
  const int per_tile = (a.prefetch_rows + tiles - 1) / tiles;  // prefetched rows per tile
  for (int p = 0, t = 0; p < a.width; p += 32, ++t) {
    const int np = a.width - p < 32 ? a.width - p : 32;
    if (a.prefetch) {
      const int r1 = a.prefetch_rows < (t + 1) * per_tile ? a.prefetch_rows : (t + 1) * per_tile;
      for (int r = t * per_tile; r < r1; ++r)
        for (int q = 0; q < a.prefetch_bytes; q += 64) _mm_prefetch(a.prefetch + r * a.prefetch_stride + q, _MM_HINT_T1);
    }
    if (np > 16) {
      if (np == 32 && (!a.fix || (p >= a.fix_lo && p + 32 <= a.fix_hi))) {
        row_tile<F, H, S, 4, true>(a, p, np, add, stream);
      } else {
        row_tile<F, H, S, 4, false>(a, p, np, add, stream);
      }
    } else {
      row_tile<F, H, S, 2, false>(a, p, np, add, stream);
    }
  }
}

// The step count known at compile time for 3x3 windows of 64 channels (9) and concatenated windows of
// 48 (7) and 50 or 52 channels (8), the common cases.
template <int F, bool H>
void row_tiles_steps(const ConvRow& a, const void* add) {
  switch (a.steps) {
    case 9: row_tiles<F, H, 9>(a, add); break;
    case 8: row_tiles<F, H, 8>(a, add); break;
    case 7: row_tiles<F, H, 7>(a, add); break;
    default: row_tiles<F, H, 0>(a, add);
  }
}

// ConvRow::window from the line buffer: word s of 8 pixels is the OR of the tap words overlapping bits
// 64 s .. 64 s + 63 of the concatenation, each shifted into place. Where each overlapping tap is read
// and how far it is shifted is worked out once per word, outside the loop over pixels.
void build_windows(const ConvRow& a) {
  const int end = (a.width + 31) / 32 * 32;
  const uint64_t* src[kMaxWindowOverlap];
  __m128i left[kMaxWindowOverlap], right;
  for (int s = 0; s < a.steps; ++s) {
    const int n = window_taps(a, s, src, left, &right);
    uint64_t* out = a.window + s * a.line;
    for (int q = 0; q < end; q += 8) {
      __m512i word = _mm512_srl_epi64(_mm512_loadu_si512(src[0] + q), right);
      for (int j = 1; j < n; ++j) word = _mm512_or_si512(word, _mm512_sll_epi64(_mm512_loadu_si512(src[j] + q), left[j]));
      _mm512_storeu_si512(out + q, word);
    }
  }
}

// exp(x) for 16 lanes: 2^n * e^f with n = round(x / ln 2), f = x - n ln 2 (two-part ln 2), e^f by its
// degree-6 Taylor polynomial (|f| <= ln 2 / 2: relative error about 2e-7), 2^n by scalef (which gives
// 0 and inf on under- and overflow).
inline __m512 exp16(__m512 x) {
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145751953125f)));
  f = _mm512_sub_ps(f, _mm512_mul_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f)));
  static const float coefficients[6] = {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : coefficients) p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// spatial_row[p] = 1 / (1 + exp(-(spatial_sum[p] + bias))).
void spatial_row(const ConvRow& a) {
  for (int p = 0; p < a.width; p += 16) {
    const __mmask16 m = a.width - p >= 16 ? __mmask16(0xffff) : __mmask16((1u << (a.width - p)) - 1);
    const __m512 t = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a.spatial_sum + p), _mm512_set1_ps(a.spatial_bias));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), t));
    _mm512_storeu_ps(a.spatial_row + p,
                     _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  }
}

// The row with its epilogue's shape (epilogue_shape) and activation type as compile-time parameters.
template <bool H>
void conv_row_as(const ConvRow& a) {
  const void* add = a.skip ? a.skip : a.residual;
  with_epilogue_shape(epilogue_shape(a, true),
                      [&](auto shape) { row_tiles_steps<decltype(shape)::value, H>(a, add); });
}

void conv_row(const ConvRow& row) {
  const ConvRow a = prepared_row(row, spatial_row, build_windows);
  if (a.half) {
    conv_row_as<true>(a);
  } else {
    conv_row_as<false>(a);
  }
  _mm_sfence();  // the streaming stores are visible before the row's task ends
}
#define SRB_CONV_ROW pack_lines, conv_row, pack_lines_half
#else
#define SRB_CONV_ROW nullptr, nullptr, nullptr
#endif

}  // namespace

const Kernels kAvx512Kernels = {"avx512", 1, pack_planar, pack_tokens, weight_words, pack_weights,
                                dot_tile, SRB_CONV_ROW};

}  // namespace srb
