// Instruction-set specific kernels: the interface shared by the scalar, AVX2 and AVX-512 builds.
//
// Each implementation lives in its own translation unit compiled with its own -m flags. Those files
// include only this header, <cstddef>, <cstdint> and <immintrin.h>, and everything they define is
// static except their Kernels table: no inline function compiled with AVX flags can then be merged by
// the linker into code that also runs on CPUs without AVX (the classic ODR trap of per-file flags).
#pragma once

#include <cstddef>
#include <cstdint>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the packed bit layout assumes a little-endian CPU"
#endif

namespace srb {

// Packed activations: one "unit" per pixel (or token) holding channel c at bit c % 64 of word c / 64,
// unused high bits 0. Implementations with words_per_word == 2 (AVX2) store every word as two words:
// its low nibbles (w & 0x0f0f...) then its high nibbles ((w >> 4) & 0x0f0f...), ready for a nibble
// lookup-table popcount.
//
// DotTile computes, for `pixels` consecutive pixels p and every output channel o,
//   counts[o, p] = sum over steps s of popcount(unit_word(p, s) ^ weight_word(o, s)),
// where unit_word(p, s) starts at x + p * pixel_stride + x_offset[s]. A step is one (tap, word) pair,
// so the caller describes any convolution window (or a plain dot product) through x_offset.
struct DotTile {
  const uint64_t* x;
  ptrdiff_t pixel_stride;
  const ptrdiff_t* x_offset;  // [steps]
  int steps;
  int pixels;
  const uint64_t* w;  // weights in this implementation's layout (see Kernels::pack_weights)
  int out_channels;   // counts are written for round_up(out_channels, 8) channels; extra ones are junk
  int32_t* counts;
  ptrdiff_t ld;      // leading dimension of counts
  bool pixel_major;  // counts[p * ld + o] instead of counts[o * ld + p]
};

// ConvRow: one output row of a convolution with the epilogue fused (used where Kernels::conv_row is
// set). Packed input "lines": word k of padded column q (q = w + KW / 2, zero outside the image) of
// window row i is x[(i * words + k) * line + q]; line >= round_up(width, 32) + KW - 1, and the columns
// past the image are 0. For output pixel p and channel o:
//   count = sum over steps s = (i, j, k) of popcount(x[offset[s] + p] ^ w[o][s]),
//   offset[s] = (i * words + k) * line + j
//   d = full - 2 * count (+ fix[o * fix_ld + p] when fix and (p < fix_lo or p >= fix_hi))
//   y[o * plane + p] = epilogue(d) in the op's fp32 order (kernels/README.md).
struct ConvRow {
  const uint64_t* x;
  ptrdiff_t line;
  const ptrdiff_t* offset;  // [steps]
  int steps, width, out_channels;
  const uint64_t* w;  // [round_up(O, 4)][steps] (= [KH][KW][words]), rows past O all 0
  int32_t full;       // KH * KW * C
  const int32_t* fix;  // [O][fix_ld >= round_up(width, 32)], or nullptr
  ptrdiff_t fix_ld;
  int fix_lo, fix_hi;
  const float* scale;    // [O]
  const float* bias;     // [O] or nullptr
  const float* channel;  // [O] or nullptr (this image's channel_scale)
  const float* spatial;  // [width] or nullptr
  // The activations: element [o * plane + p] of skip (X itself), residual and y, of type float, or float16
  // (IEEE binary16 as uint16_t: read exactly, y rounded to nearest even) when `half` (only on a path with
  // Kernels::pack_lines_half).
  const void* skip;      // or nullptr
  const void* residual;  // or nullptr
  bool half;
  // float16 y: write full 64-byte aligned blocks with streaming stores (a Y too large to stay in the cache
  // for the next op). float y is always streamed where aligned.
  bool stream_half;
  bool relu;
  const float* slope;  // [O] PReLU slopes, or nullptr
  ptrdiff_t plane;
  void* y;
  // Software prefetch, spread over the row's tiles: prefetch_rows lines of prefetch_bytes at
  // prefetch + r * prefetch_stride bytes (what the next row's epilogue reads: residual or skip), or nullptr.
  const char* prefetch;
  ptrdiff_t prefetch_stride;
  int prefetch_rows, prefetch_bytes;
  // Concatenated windows (C < 64, one word per tap), when concat_channels = C > 0: the kernel first
  // writes, for every pixel, its window's KH * KW * C bits as `steps` words into `window` (word s of
  // pixel p at window[s * line + p]; tap t = i * KW + j holds bits t * C .. t * C + C - 1 of the
  // concatenation), then counts on those with offset[s] = s * line; w holds weights in the same layout.
  // Fewer steps than one word per tap: every popcount works on (nearly) 64 bits in use.
  int concat_channels, kh, kw;
  uint64_t* window;
  // Fused spatial map, when spatial_sum is set (and spatial is not): spatial = sigmoid(spatial_sum[p] +
  // spatial_bias), computed once per row into spatial_row ([round_up(width, 16)] scratch).
  const float* spatial_sum;
  float spatial_bias;
  float* spatial_row;
  // When set: channel_sums[o * 16 + lane] += the outputs of channel o (lane = pixel % 16; once per tile
  // of 32 pixels), for the op's optional channel_mean output.
  float* channel_sums;
};

struct Kernels {
  const char* name;
  int words_per_word;
  // `rows` consecutive image rows of `width` pixels: channel c of pixel (r, p) is
  // x[c * channel_stride + r * width + p]; bit = x >= threshold[c]. Its unit starts at
  // out + (r * out_row_stride + p) * unit; only the channel bytes in use are written.
  void (*pack_planar)(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                      const float* threshold, uint64_t* out, ptrdiff_t unit, ptrdiff_t out_row_stride);
  // Tokens: channel k of token m is x[m * channels + k]. Same output as pack_planar.
  void (*pack_tokens)(const float* x, int tokens, int channels, const float* threshold,
                      uint64_t* out, ptrdiff_t unit);
  // Weights given as [O][steps] words -> this implementation's layout, weight_words(O, steps) long.
  size_t (*weight_words)(int out_channels, int steps);
  void (*pack_weights)(const uint64_t* w, int out_channels, int steps, uint64_t* out);
  void (*dot_tile)(const DotTile& tile);
  // Optional (nullptr where not implemented): `rows` rows of `width` pixels -> the ConvRow line layout,
  // row r's word k at out + (r * words + k) * line (pixel p at word index p; only pixels < width written).
  // With spatial_weight, also spatial_sum[r * width + p] = sum over c (in order) of w[c] * x[c, r, p].
  void (*pack_lines)(const float* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                     const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                     float* spatial_sum);
  void (*conv_row)(const ConvRow& row);
  // Optional: pack_lines for float16 X (uint16_t bits, converted exactly); where set, conv_row also takes
  // ConvRow::half.
  void (*pack_lines_half)(const uint16_t* x, ptrdiff_t channel_stride, int channels, int rows, int width,
                          const float* threshold, uint64_t* out, ptrdiff_t line, const float* spatial_weight,
                          float* spatial_sum);
};

extern const Kernels kScalarKernels;
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;

// ---- helpers shared by the implementations (static: each translation unit gets its own copy) ----

// Transposes the 8x8 bit matrix held in a word (row r = byte r, column c = bit c of that byte).
static inline uint64_t transpose8x8_bits(uint64_t m) {
  uint64_t t = (m ^ (m >> 7)) & 0x00aa00aa00aa00aaULL;
  m ^= t ^ (t << 7);
  t = (m ^ (m >> 14)) & 0x0000cccc0000ccccULL;
  m ^= t ^ (t << 14);
  t = (m ^ (m >> 28)) & 0x00000000f0f0f0f0ULL;
  return m ^ t ^ (t << 28);
}

// Stores the byte holding channels 8g..8g+7 into a unit (as bytes).
template <bool kSplit>
static inline void store_channel_byte(uint8_t* unit, int g, uint8_t bits) {
  if (kSplit) {
    uint8_t* word = unit + 16 * (g / 8);
    word[g % 8] = bits & 0x0f;
    word[8 + g % 8] = bits >> 4;
  } else {
    unit[g] = bits;
  }
}

// Bit i = (x[i * stride] >= t) for i < n.
static inline unsigned threshold_bits(const float* x, ptrdiff_t stride, int n, float t) {
  unsigned m = 0;
  for (int i = 0; i < n; ++i) m |= unsigned(x[i * stride] >= t) << i;
  return m;
}

// pack_planar for a given 8-pixel comparator: mask8(x, t) = bits (x[i] >= t), i < 8.
// Channel groups outside, pixels inside: 8 input streams at a time run through the whole band of rows
// (contiguous per channel), and the band's units stay in L2.
template <bool kSplit, class Mask8>
static inline void pack_planar_with(const float* x, ptrdiff_t channel_stride, int channels, int rows,
                                    int width, const float* threshold, uint64_t* out, ptrdiff_t unit,
                                    ptrdiff_t out_row_stride, Mask8 mask8) {
  uint8_t* bytes = reinterpret_cast<uint8_t*>(out);
  for (int g = 0; g * 8 < channels; ++g) {
    const int nc = channels - 8 * g < 8 ? channels - 8 * g : 8;
    for (int r = 0; r < rows; ++r) {
      uint8_t* row_out = bytes + r * out_row_stride * unit * 8;
      for (int p0 = 0; p0 < width; p0 += 8) {
        const int np = width - p0 < 8 ? width - p0 : 8;
        uint64_t m = 0;  // byte i: pixels p0.. of channel 8g+i
        for (int i = 0; i < nc; ++i) {
          const int c = 8 * g + i;
          const float* in = x + c * channel_stride + ptrdiff_t(r) * width + p0;
          const unsigned bits = np == 8 ? mask8(in, threshold[c]) : threshold_bits(in, 1, np, threshold[c]);
          m |= uint64_t(bits) << (8 * i);
        }
        m = transpose8x8_bits(m);  // byte j: channels 8g.. of pixel p0+j
        for (int j = 0; j < np; ++j)
          store_channel_byte<kSplit>(row_out + (p0 + j) * unit * 8, g, uint8_t(m >> (8 * j)));
      }
    }
  }
}

// pack_tokens for a given comparator: mask8(x, t) = bits (x[i] >= t[i]), i < 8.
template <bool kSplit, class Mask8>
static inline void pack_tokens_with(const float* x, int tokens, int channels,
                                    const float* threshold, uint64_t* out, ptrdiff_t unit,
                                    Mask8 mask8) {
  uint8_t* bytes = reinterpret_cast<uint8_t*>(out);
  for (int m = 0; m < tokens; ++m) {
    const float* row = x + ptrdiff_t(m) * channels;
    for (int g = 0; g * 8 < channels; ++g) {
      const int c = 8 * g;
      unsigned bits;
      if (channels - c >= 8) {
        bits = mask8(row + c, threshold + c);
      } else {
        bits = 0;
        for (int i = 0; c + i < channels; ++i) bits |= unsigned(row[c + i] >= threshold[c + i]) << i;
      }
      store_channel_byte<kSplit>(bytes + m * unit * 8, g, uint8_t(bits));
    }
  }
}

}  // namespace srb
