// onnxruntime custom ops of the "srbinarize" domain: BinaryConv2d, BinaryLinear and ShuffleTaps (see README.md).
//
// Built against the onnxruntime C/C++ API headers only: the library gets the API table from
// RegisterCustomOps' OrtApiBase (ORT_API_MANUAL_INIT) and does not link libonnxruntime.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"

#define SRB_EXPORT extern "C" __attribute__((visibility("default")))

namespace srb {
namespace {

constexpr const char* kDomain = "srbinarize";

using Shape = std::vector<int64_t>;

std::string ShapeString(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t Words(int64_t channels) { return (channels + 63) / 64; }

// Runs f(), turning exceptions into an OrtStatus for the C boundary.
template <class F>
OrtStatusPtr Guard(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
}

// Runs fn(i) for i < total on onnxruntime's intra-op thread pool.
template <class F>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, F& fn) {
  ctx.ParallelFor([](void* f, size_t i) { (*static_cast<F*>(f))(i); }, total, 0, &fn);
}

// Names the node in every error: "BinaryConv2d node 'conv3': ...".
struct Node {
  std::string prefix;

  [[noreturn]] void Fail(const std::string& msg) const {
    throw Ort::Exception(prefix + msg, ORT_INVALID_ARGUMENT);
  }

  int64_t IntAttribute(const Ort::ConstKernelInfo& info, const char* name, const int64_t* fallback,
                       int64_t lo, int64_t hi) const {
    int64_t v;
    try {
      v = info.GetAttribute<int64_t>(name);
    } catch (const Ort::Exception&) {
      if (!fallback) Fail(std::string("missing int attribute '") + name + "'");
      v = *fallback;
    }
    if (v < lo || v > hi)
      Fail(std::string("attribute '") + name + "' = " + std::to_string(v) + " is out of range [" +
           std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
  }

  // Element types are checked here rather than declared in the op schema (but for the input whose type picks
  // an overload, BinaryConv2d's X), so that a wrong one gets an error saying what was expected. Absent
  // optional inputs have an empty name.
  // Input 2 is uint64, the inputs listed in `activations` are `activation_type`, the others float32.
  void CheckTypes(const Ort::ConstKernelInfo& info, const std::vector<const char*>& names,
                  const std::vector<size_t>& activations = {},
                  ONNXTensorElementDataType activation_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) const {
    for (size_t i = 0; i < info.GetInputCount() && i < names.size(); ++i) {
      if (info.GetInputName(i).empty()) continue;
      const auto type = info.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
      const bool activation = std::find(activations.begin(), activations.end(), i) != activations.end();
      const auto expected = i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64
                            : activation ? activation_type
                                         : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      if (type != expected)
        Fail(std::string("input '") + names[i] + "' must be " + TypeName(expected) + ", got " + TypeName(type));
    }
  }

  static std::string TypeName(ONNXTensorElementDataType t) {
    switch (t) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
      default: return "ONNX element type " + std::to_string(int(t));
    }
  }

  // A tensor input, or nullptr data for an absent optional one.
  struct Input {
    const void* data = nullptr;
    Shape shape;
  };

  Input Get(const Ort::KernelContext& ctx, size_t index) const {
    Input in;
    if (index >= ctx.GetInputCount()) return in;
    Ort::ConstValue v = ctx.GetInput(index);
    if (!static_cast<const OrtValue*>(v)) return in;
    in.shape = v.GetTensorTypeAndShapeInfo().GetShape();
    in.data = v.GetTensorRawData();
    return in;
  }

  void Expect(const Input& in, const char* name, const Shape& expected, const char* what) const {
    if (in.shape != expected)
      Fail(std::string("input '") + name + "' must have shape " + ShapeString(expected) + " (" +
           what + "), got " + ShapeString(in.shape));
  }
};

// Packed weights in the layout of one kernel implementation, plus (convolutions) the popcount of
// every tap: the kernels treat a tap in the zero padding as an all-zero word, which adds
// popcount(w[o, tap]) to sum popcount(x ^ w) although it must contribute 0 to the dot product.
// For a pixel with n valid taps: dot = n * C - 2 * (sum - sum of tap_popcount over padded taps).
struct PreparedWeights {
  int64_t out_channels = 0;
  std::vector<uint64_t> packed;
  std::vector<int32_t> tap_popcount;  // [O][taps]
  std::vector<uint64_t> rows;         // ConvRow layout [round_up(O, 4)][steps] (Kernels::conv_row)
  int concat_steps = 0;               // > 0: rows hold concatenated windows of that many words (ConvRow)
};

// Output element p = epilogue(base[p] - 2 * count[p]), one pass, fp32 ops in the order of the
// PyTorch layer: t = dot * scale; t *= spatial; t *= channel_scale; t += bias; t += x.
struct Epilogue {
  float scale, channel_scale, bias;
  const float* spatial;  // per element, or nullptr
  const float* skip;     // per element, or nullptr
};

template <bool kSpatial, bool kChannel, bool kBias, bool kSkip>
void ApplyEpilogue(const Epilogue& e, const int32_t* base, const int32_t* count, int n, float* out) {
  for (int p = 0; p < n; ++p) {
    float t = float(base[p] - 2 * count[p]) * e.scale;
    if (kSpatial) t *= e.spatial[p];
    if (kChannel) t *= e.channel_scale;
    if (kBias) t += e.bias;
    if (kSkip) t += e.skip[p];
    out[p] = t;
  }
}

using EpilogueFn = void (*)(const Epilogue&, const int32_t*, const int32_t*, int, float*);

// The loop specialized for which epilogue inputs are present (keeps it one vectorized pass).
EpilogueFn SelectEpilogue(bool spatial, bool channel, bool bias, bool skip) {
  static const EpilogueFn table[16] = {
      ApplyEpilogue<0, 0, 0, 0>, ApplyEpilogue<0, 0, 0, 1>, ApplyEpilogue<0, 0, 1, 0>, ApplyEpilogue<0, 0, 1, 1>,
      ApplyEpilogue<0, 1, 0, 0>, ApplyEpilogue<0, 1, 0, 1>, ApplyEpilogue<0, 1, 1, 0>, ApplyEpilogue<0, 1, 1, 1>,
      ApplyEpilogue<1, 0, 0, 0>, ApplyEpilogue<1, 0, 0, 1>, ApplyEpilogue<1, 0, 1, 0>, ApplyEpilogue<1, 0, 1, 1>,
      ApplyEpilogue<1, 1, 0, 0>, ApplyEpilogue<1, 1, 0, 1>, ApplyEpilogue<1, 1, 1, 0>, ApplyEpilogue<1, 1, 1, 1>};
  return table[spatial * 8 + channel * 4 + bias * 2 + skip];
}

// Validates a weight tensor [O, taps..., words] and packs it for `isa`.
PreparedWeights PrepareWeights(const Node& node, const Kernels& isa, const Node::Input& w,
                               const Shape& tail, const char* layout, int64_t channels) {
  if (w.shape.size() != tail.size() + 1 || w.shape[0] < 1 || w.shape[0] > INT_MAX ||
      !std::equal(tail.begin(), tail.end(), w.shape.begin() + 1)) {
    std::string expected = "[O";
    for (int64_t d : tail) expected += ", " + std::to_string(d);
    node.Fail("input 'weight' must be uint64 of shape " + expected + "] (" + layout + "), got " +
              ShapeString(w.shape));
  }
  PreparedWeights p;
  p.out_channels = w.shape[0];
  const int64_t words = tail.back();
  int64_t steps = 1;
  for (int64_t d : tail) steps *= d;
  const auto* data = static_cast<const uint64_t*>(w.data);
  const int used = int(channels - 64 * (words - 1));  // bits in use in the last word of a tap
  const uint64_t unused = used == 64 ? 0 : ~0ULL << used;
  for (int64_t i = words - 1; i < p.out_channels * steps; i += words)
    if (data[i] & unused)
      node.Fail("input 'weight' has bits set above in_channels = " + std::to_string(channels) +
                " (the unused high bits of each tap's last word must be 0)");
  p.packed.resize(isa.weight_words(int(p.out_channels), int(steps)));
  isa.pack_weights(data, int(p.out_channels), int(steps), p.packed.data());
  if (tail.size() > 1 && isa.conv_row) {
    const int64_t taps = steps / words, concat = (taps * channels + 63) / 64;
    const size_t o4 = size_t((p.out_channels + 3) / 4 * 4);
    if (words == 1 && concat < taps) {  // C < 64: concatenate the taps' channel bits (see ConvRow)
      p.concat_steps = int(concat);
      p.rows.assign(o4 * concat, 0);
      for (int64_t o = 0; o < p.out_channels; ++o)
        for (int64_t t = 0; t < taps; ++t) {
          const uint64_t bits = data[o * taps + t];
          const int64_t pos = t * channels, word = pos / 64, off = pos % 64;
          p.rows[o * concat + word] |= bits << off;
          if (off + channels > 64) p.rows[o * concat + word + 1] |= bits >> (64 - off);
        }
    } else {
      p.rows.assign(o4 * steps, 0);
      std::copy(data, data + p.out_channels * steps, p.rows.begin());
    }
  }
  if (tail.size() > 1) {  // a convolution: [O, KH, KW, words]
    p.tap_popcount.resize(p.out_channels * steps / words);
    for (size_t t = 0; t < p.tap_popcount.size(); ++t) {
      int32_t pop = 0;
      for (int64_t k = 0; k < words; ++k) pop += __builtin_popcountll(data[t * words + k]);
      p.tap_popcount[t] = pop;
    }
  }
  return p;
}

const Kernels& SelectOrFail(const Node& node) {
  std::string error;
  const Kernels* k = SelectKernels(&error);
  if (!k) node.Fail(error);
  return *k;
}

// ------------------------------------------------------------------------------------------------
// BinaryConv2d
// ------------------------------------------------------------------------------------------------

// s[p] = 1 / (1 + exp(-(s[p] + bias))), exp as in the AVX-512 kernel (2^n e^f, degree-6 polynomial): no
// library call in the loop, so that the compiler vectorizes it on any path.
void Sigmoid(float* s, float bias, ptrdiff_t n) {
  for (ptrdiff_t p = 0; p < n; ++p) {
    const float x = std::min(88.f, std::max(-88.f, -(s[p] + bias)));  // exp stays finite; sigmoid saturates
    // round(x / ln 2): the argument is positive, so truncating is flooring
    const float k = float(int32_t(x * 1.44269504088896341f + 128.5f)) - 128.f;
    float f = x - k * 0.693145751953125f;
    f = f - k * 1.42860682030941723212e-6f;
    float e = 1.f / 720;
    e = e * f + 1.f / 120;
    e = e * f + 1.f / 24;
    e = e * f + 1.f / 6;
    e = e * f + 0.5f;
    e = e * f + 1.f;
    e = e * f + 1.f;
    const int32_t bits = (int32_t(k) + 127) << 23;  // 2^k, k in [-127, 127]
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    s[p] = 1.f / (1.f + e * scale);
  }
}

// Sum of n floats in 8 interleaved float lanes (a loop the compiler vectorizes), added in double.
double Sum(const float* x, int n) {
  float lanes[8] = {};
  int p = 0;
  for (; p + 8 <= n; p += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[p + l];
  double sum = 0;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  for (; p < n; ++p) sum += x[p];
  return sum;
}

// channel_mean[n, o] = (sum over image n's bands, in order, of band_sums[band][o]) / plane.
void ReduceBandSums(const std::vector<double>& band_sums, int64_t images, int64_t bands_per_image, int64_t O,
                    int64_t plane, float* channel_mean) {
  for (int64_t n = 0; n < images; ++n)
    for (int64_t o = 0; o < O; ++o) {
      double sum = 0;
      for (int64_t b = 0; b < bands_per_image; ++b) sum += band_sums[(n * bands_per_image + b) * O + o];
      channel_mean[n * O + o] = float(sum / double(plane));
    }
}

// IEEE binary16 <-> float32, bit exact (round to nearest even, as numpy's astype), for the float16
// activations on paths that compute in float32.
float HalfToFloatOne(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (!mantissa) {
    bits = sign;
  } else {  // subnormal: mantissa * 2^-24, normalized
    int shifts = 0;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      ++shifts;
    }
    bits = sign | (uint32_t(113 - shifts) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t FloatToHalfOne(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN stays (quiet) NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 (and inf): inf
  if (a >= 0x38800000u)                                     // normal: exponent >= -14
    return uint16_t(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
  if (a <= 0x33000000u) return sign;  // <= 2^-25: 0 (2^-25 itself ties to even)
  const uint32_t full = (a & 0x7fffffu) | 0x800000u;
  const int shift = 126 - int(a >> 23);  // half subnormal m * 2^-24: m = full >> shift, rounded
  uint32_t m = full >> shift;
  const uint32_t rest = full & ((1u << shift) - 1), tie = 1u << (shift - 1);
  if (rest > tie || (rest == tie && (m & 1u))) ++m;
  return uint16_t(sign | m);
}

void HalfToFloat(const uint16_t* in, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = HalfToFloatOne(in[i]);
}

void FloatToHalf(const float* in, size_t n, uint16_t* out) {
  for (size_t i = 0; i < n; ++i) out[i] = FloatToHalfOne(in[i]);
}

class ConvKernel {
 public:
  explicit ConvKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node_.prefix = "BinaryConv2d node '" + info.GetNodeName() + "': ";
    // X and residual: float32, or float16 in the overload registered for it (the type of X picks it).
    half_ = info.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetElementType() ==
            ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    node_.CheckTypes(info,
                     {"X", "threshold", "weight", "scale", "bias", "spatial", "channel_scale", "residual",
                      "prelu_slope", "spatial_weight", "spatial_bias"},
                     {0, 7}, half_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    isa_ = &SelectOrFail(node_);
    std::vector<int64_t> k;
    try {
      k = info.GetAttributes<int64_t>("kernel_shape");
    } catch (const Ort::Exception&) {
      node_.Fail("missing ints attribute 'kernel_shape' ([KH, KW], odd)");
    }
    if (k.size() != 2 || k[0] < 1 || k[1] < 1 || k[0] % 2 == 0 || k[1] % 2 == 0 || k[0] > 63 ||
        k[1] > 63)
      node_.Fail("attribute 'kernel_shape' must be [KH, KW] with odd sizes in [1, 63], got " +
                 ShapeString(k));
    kh_ = k[0];
    kw_ = k[1];
    channels_ = node_.IntAttribute(info, "in_channels", nullptr, 1, 1 << 16);  // dot products fit int32
    const int64_t no_skip = 0;
    skip_ = node_.IntAttribute(info, "skip", &no_skip, 0, 1) == 1;
    relu_ = node_.IntAttribute(info, "relu", &no_skip, 0, 1) == 1;
    int is_constant = 0;
    Ort::ConstValue w = info.GetTensorConstantInput(2, &is_constant);
    if (is_constant) {  // an initializer: pack once for the life of the session
      Node::Input in;
      in.shape = w.GetTensorTypeAndShapeInfo().GetShape();
      in.data = w.GetTensorRawData();
      weights_ = Prepare(in);
      have_weights_ = true;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return Guard([&] { Compute(context); }); }

 private:
  PreparedWeights Prepare(const Node::Input& w) const {
    PreparedWeights p = PrepareWeights(node_, *isa_, w, {kh_, kw_, Words(channels_)},
                                       "packed sign bits, 64 input channels per word", channels_);
    if (skip_ && p.out_channels != channels_)
      node_.Fail("skip = 1 needs out channels == in_channels = " + std::to_string(channels_) +
                 ", weight has " + std::to_string(p.out_channels));
    return p;
  }

  void Compute(OrtKernelContext* context) const;
  // Per class of rows (the same valid window rows), the integer border correction [O][round_up(W, 32)].
  struct RowTables {
    int h = 0, w = 0;
    std::vector<int> row_class;                 // [H]
    std::vector<std::pair<int, int>> classes;  // valid window rows [r0, r1) of each class
    std::vector<int32_t> fix;                   // [classes][O][round_up(W, 32)]
  };
  std::shared_ptr<const RowTables> BuildRowTables(const PreparedWeights& wt, int H, int W) const;
  // One call's tensors. x, residual and y are float, or float16 (uint16_t bits) when `half`.
  struct Args {
    const void* x;
    const float* threshold;
    const PreparedWeights& wt;
    const float *scale, *bias, *spatial, *channel;
    const void* residual;
    const float *slope, *spatial_weight;
    float spatial_bias;
    void* y;
    float* channel_mean;
    int n, h, w;
    bool half;
  };
  void ComputeRows(const Ort::KernelContext& ctx, const Args& a) const;
  void ComputeBands(const Ort::KernelContext& ctx, const Args& a) const;

  Node node_;
  const Kernels* isa_ = nullptr;
  int64_t kh_ = 0, kw_ = 0, channels_ = 0;
  bool skip_ = false;
  bool relu_ = false;
  bool half_ = false;  // X, residual and Y are float16
  bool have_weights_ = false;
  PreparedWeights weights_;
  mutable std::mutex tables_mutex_;
  mutable std::shared_ptr<const RowTables> tables_;
};

void ConvKernel::Compute(OrtKernelContext* context) const {
  Ort::KernelContext ctx(context);
  const Node::Input x = node_.Get(ctx, 0);
  const char* type = half_ ? "float16" : "float32";
  if (x.shape.size() != 4 || x.shape[1] != channels_)
    node_.Fail(std::string("input 'X' must be ") + type + " [N, C, H, W] with C = in_channels = " +
               std::to_string(channels_) + ", got " + ShapeString(x.shape));
  const int64_t n_images = x.shape[0], h_in = x.shape[2], w_in = x.shape[3];
  if (n_images > INT_MAX || h_in > INT_MAX || w_in > INT_MAX) node_.Fail("input 'X' is too large");
  node_.Expect(node_.Get(ctx, 1), "threshold", {channels_}, "float32 [C]");
  PreparedWeights local;
  if (!have_weights_) local = Prepare(node_.Get(ctx, 2));
  const PreparedWeights& wt = have_weights_ ? weights_ : local;
  const int64_t O = wt.out_channels;
  const Node::Input scale = node_.Get(ctx, 3), bias = node_.Get(ctx, 4), spatial = node_.Get(ctx, 5),
                    chan = node_.Get(ctx, 6), residual = node_.Get(ctx, 7), slope = node_.Get(ctx, 8);
  node_.Expect(scale, "scale", {O}, "float32 [O]");
  if (residual.data)
    node_.Expect(residual, "residual", {n_images, O, h_in, w_in}, half_ ? "float16 [N, O, H, W]" : "float32 [N, O, H, W]");
  if (slope.data) node_.Expect(slope, "prelu_slope", {O}, "float32 [O]");
  if (slope.data && relu_) node_.Fail("relu = 1 and a prelu_slope input: give one of them");
  const Node::Input spatial_w = node_.Get(ctx, 9), spatial_b = node_.Get(ctx, 10);
  if (spatial_w.data || spatial_b.data) {
    if (spatial.data) node_.Fail("inputs 'spatial' and 'spatial_weight' / 'spatial_bias': give one of them");
    node_.Expect(spatial_w, "spatial_weight", {channels_}, "float32 [C]");
    node_.Expect(spatial_b, "spatial_bias", {1}, "float32 [1]");
  }
  if (bias.data) node_.Expect(bias, "bias", {O}, "float32 [O]");
  if (spatial.data) node_.Expect(spatial, "spatial", {n_images, 1, h_in, w_in}, "float32 [N, 1, H, W]");
  if (chan.data) node_.Expect(chan, "channel_scale", {n_images, O}, "float32 [N, O]");

  void* y = ctx.GetOutput(0, {n_images, O, h_in, w_in}).GetTensorMutableRawData();
  // Optional output channel_mean [N, O]: the mean over H x W of each output channel (for a SCALES channel
  // vector of the next layer). Per band partial sums, added in band order: independent of the threads.
  float* channel_mean = ctx.GetOutputCount() > 1 ? ctx.GetOutput(1, {n_images, O}).GetTensorMutableData<float>()
                                                 : nullptr;
  if (n_images * h_in * w_in == 0) {
    if (channel_mean) std::fill(channel_mean, channel_mean + n_images * O, std::nanf(""));
    return;
  }
  Args a{x.data, static_cast<const float*>(node_.Get(ctx, 1).data), wt, static_cast<const float*>(scale.data),
         static_cast<const float*>(bias.data), static_cast<const float*>(spatial.data),
         static_cast<const float*>(chan.data), residual.data, static_cast<const float*>(slope.data),
         static_cast<const float*>(spatial_w.data),
         spatial_b.data ? *static_cast<const float*>(spatial_b.data) : 0.f, y, channel_mean,
         int(n_images), int(h_in), int(w_in), half_};
  const auto run = [&](const Args& args) {
    if (isa_->conv_row) {
      ComputeRows(ctx, args);
    } else {
      ComputeBands(ctx, args);
    }
  };
  if (!half_ || isa_->pack_lines_half) {
    run(a);
    return;
  }
  // float16 on a path without it: float32 copies at the op's boundary (exact both ways but the rounding of Y).
  const size_t x_count = size_t(n_images * channels_ * h_in * w_in), y_count = size_t(n_images * O * h_in * w_in);
  std::vector<float> x32(x_count), residual32(residual.data ? y_count : 0), y32(y_count);
  HalfToFloat(static_cast<const uint16_t*>(x.data), x_count, x32.data());
  if (residual.data) HalfToFloat(static_cast<const uint16_t*>(residual.data), y_count, residual32.data());
  a.x = x32.data();
  a.residual = residual.data ? residual32.data() : nullptr;
  a.y = y32.data();
  a.half = false;
  run(a);
  FloatToHalf(y32.data(), y_count, static_cast<uint16_t*>(y));
}

// The portable path (Kernels::dot_tile): float32 activations only.
void ConvKernel::ComputeBands(const Ort::KernelContext& ctx, const Args& a) const {
  const int64_t n_images = a.n, h_in = a.h, w_in = a.w, O = a.wt.out_channels;
  const PreparedWeights& wt = a.wt;
  float* y = static_cast<float*>(a.y);
  float* channel_mean = a.channel_mean;
  const auto* sw = a.spatial_weight;
  const float sb = a.spatial_bias;
  // The spatial map from spatial_weight / spatial_bias, one pass before the conv.
  std::vector<float> spatial_map;
  const float* spatial_data = a.spatial;
  if (sw) {
    const auto* xf = static_cast<const float*>(a.x);
    const ptrdiff_t plane = h_in * w_in;
    spatial_map.assign(size_t(n_images * plane), 0.f);
    for (int64_t n = 0; n < n_images; ++n) {
      float* s = spatial_map.data() + n * plane;
      for (int64_t c = 0; c < channels_; ++c)
        for (ptrdiff_t p = 0; p < plane; ++p) s[p] += xf[(n * channels_ + c) * plane + p] * sw[c];
      Sigmoid(s, sb, plane);
    }
    spatial_data = spatial_map.data();
  }
  const Kernels& isa = *isa_;
  const int C = int(channels_), H = int(h_in), W = int(w_in), KH = int(kh_), KW = int(kw_);
  const int ph = KH / 2, pw = KW / 2, Wp = W + 2 * pw;
  const ptrdiff_t unit = Words(C) * isa.words_per_word;  // packed words per pixel
  const ptrdiff_t plane = ptrdiff_t(H) * W;
  const int steps = KH * KW * int(Words(C));
  std::vector<ptrdiff_t> x_offset(steps);  // tap (i, j), word k of a pixel's window
  for (int t = 0, s = 0; t < KH * KW; ++t)
    for (int k = 0; k < Words(C); ++k) x_offset[s++] = ((t / KW) * Wp + t % KW) * unit + k * isa.words_per_word;
  const int O8 = int((O + 7) / 8 * 8);
  const int TW = O8 <= 128 ? 64 : std::max(8, 8192 / O8 / 8 * 8);  // pixel tile: counts stay in L1
  // Work unit: a band of output rows of one image (at least 32 bands when the image allows). Its input
  // rows (plus halo) are binarized into a zero-bordered NHWC bit buffer of at most about 256 KB, so
  // packing streams X once and the popcount loop reads from L2.
  const ptrdiff_t row_words = Wp * unit;
  const ptrdiff_t min_bands = 32;  // enough tasks to balance the thread pool
  const int band = int(std::clamp<ptrdiff_t>(
      std::min<ptrdiff_t>(32768 / row_words - 2 * ph, (n_images * H + min_bands - 1) / min_bands), 4, 32));
  const int bands_per_image = (H + band - 1) / band;
  const size_t bands = size_t(n_images) * bands_per_image;
  const auto* xf = static_cast<const float*>(a.x);
  const float* thr = a.threshold;
  const float* scale_f = a.scale;
  const float* bias_f = a.bias;
  const float* spatial_f = spatial_data;
  const float* chan_f = a.channel;
  const auto* residual_f = static_cast<const float*>(a.residual);
  const float* slope_f = a.slope;
  const int32_t full = KH * KW * C;
  const EpilogueFn epilogue = SelectEpilogue(spatial_f, chan_f, bias_f, skip_);
  std::vector<double> band_sums(channel_mean ? bands * O : 0, 0.0);  // [band][O]: for channel_mean
  std::atomic<bool> out_of_memory{false};

  auto run_band = [&](size_t b) {
    const ptrdiff_t n = b / bands_per_image;
    const int h0 = int(b % bands_per_image) * band, h1 = std::min(H, h0 + band);
    // Per-thread scratch, reused across bands and calls (tasks must not throw into the thread pool).
    thread_local std::vector<uint64_t> packed;
    thread_local std::vector<int32_t> counts, base, padded_popcount;
    try {
      packed.assign((h1 - h0 + 2 * ph) * row_words, 0);
      counts.resize(size_t(O8) * TW);
      base.resize(TW);
      padded_popcount.resize(O);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
      return;
    }
    // Input rows r0..r1 of the band's windows; buffer row i holds image row h0 - ph + i.
    const int r0 = std::max(0, h0 - ph), r1 = std::min(H, h1 + ph);
    isa.pack_planar(xf + n * C * plane + ptrdiff_t(r0) * W, plane, C, r1 - r0, W, thr,
                    packed.data() + ((r0 - h0 + ph) * Wp + pw) * unit, unit, Wp);
    int cached[4] = {-1, -1, -1, -1};  // valid tap ranges padded_popcount was computed for
    for (int h = h0; h < h1; ++h) {
      const bool border_row = h < ph || h >= H - ph;
      float* y_row = y + n * O * plane + ptrdiff_t(h) * W;
      for (int p0 = 0; p0 < W; p0 += TW) {
        const int np = std::min(TW, W - p0);
        // Fetch the tile's output lines (and the residual's and the skip's it reads) while the popcounts
        // run: the epilogue then works in cache.
        const float* res_row = residual_f ? residual_f + n * O * plane + ptrdiff_t(h) * W : nullptr;
        const float* skip_row = skip_ ? xf + n * C * plane + ptrdiff_t(h) * W : nullptr;
        for (int o = 0; o < O; ++o)
          for (int p = 0; p < np; p += 16) {
            __builtin_prefetch(y_row + o * plane + p0 + p, 1);
            if (res_row) __builtin_prefetch(res_row + o * plane + p0 + p);
            if (skip_row) __builtin_prefetch(skip_row + o * plane + p0 + p);
          }
        isa.dot_tile(DotTile{packed.data() + ((h - h0) * Wp + p0) * unit, unit, x_offset.data(), steps, np,
                             wt.packed.data(), int(O), counts.data(), TW, false});
        // Pixels whose window reaches into the padding: valid taps only (see PreparedWeights). The
        // correction per channel is computed once per distinct set of valid taps.
        std::fill(base.begin(), base.begin() + np, full);
        auto fix = [&](int p) {
          const int w = p0 + p;
          const int valid[4] = {std::max(0, ph - h), std::min(KH, H + ph - h), std::max(0, pw - w),
                                std::min(KW, W + pw - w)};
          if (!std::equal(valid, valid + 4, cached)) {
            std::copy(valid, valid + 4, cached);
            for (int o = 0; o < O; ++o) {
              const int32_t* tap_popcount = wt.tap_popcount.data() + o * KH * KW;
              int32_t sum = 0;
              for (int i = 0; i < KH; ++i)
                for (int j = 0; j < KW; ++j)
                  if (i < valid[0] || i >= valid[1] || j < valid[2] || j >= valid[3]) sum += tap_popcount[i * KW + j];
              padded_popcount[o] = sum;
            }
          }
          base[p] = (valid[1] - valid[0]) * (valid[3] - valid[2]) * C;
          for (int o = 0; o < O; ++o) counts[o * TW + p] -= padded_popcount[o];
        };
        const int left_end = border_row ? np : std::max(0, std::min(np, pw - p0));  // w < pw
        for (int p = 0; p < left_end; ++p) fix(p);
        for (int p = std::max(left_end, W - pw - p0); p < np; ++p) fix(p);  // w >= W - pw
        Epilogue e{0.f, 1.f, 0.f, spatial_f ? spatial_f + n * plane + ptrdiff_t(h) * W + p0 : nullptr, nullptr};
        for (int o = 0; o < O; ++o) {
          e.scale = scale_f[o];
          if (chan_f) e.channel_scale = chan_f[n * O + o];
          if (bias_f) e.bias = bias_f[o];
          if (skip_) e.skip = xf + (n * C + o) * plane + ptrdiff_t(h) * W + p0;
          float* out = y_row + o * plane + p0;
          epilogue(e, base.data(), counts.data() + o * TW, np, out);
          if (residual_f) {
            const float* r = residual_f + (n * O + o) * plane + ptrdiff_t(h) * W + p0;
            for (int p = 0; p < np; ++p) out[p] += r[p];
          }
          if (relu_)
            for (int p = 0; p < np; ++p) out[p] = out[p] < 0.f ? 0.f : out[p];  // NaN stays NaN
          if (slope_f)
            for (int p = 0; p < np; ++p) out[p] = out[p] < 0.f ? out[p] * slope_f[o] : out[p];
          if (channel_mean) {
            band_sums[b * O + o] += Sum(out, np);
          }
        }
      }
    }
  };
  ParallelFor(ctx, bands, run_band);
  if (out_of_memory) throw std::bad_alloc();
  if (channel_mean) ReduceBandSums(band_sums, n_images, bands_per_image, O, plane, channel_mean);
}

std::shared_ptr<const ConvKernel::RowTables> ConvKernel::BuildRowTables(const PreparedWeights& wt, int H,
                                                                       int W) const {
  const int C = int(channels_), KH = int(kh_), KW = int(kw_), O = int(wt.out_channels);
  const int ph = KH / 2, pw = KW / 2;
  const ptrdiff_t W32 = (W + 31) / 32 * 32;
  const int32_t full = KH * KW * C;
  // Row classes: rows with the same valid window rows share a correction table [O][W32].
  auto t = std::make_shared<RowTables>();
  t->h = H;
  t->w = W;
  std::vector<int>& row_class = t->row_class;
  row_class.resize(H);
  std::vector<std::pair<int, int>>& classes = t->classes;
  for (int h = 0; h < H; ++h) {
    const std::pair<int, int> valid{std::max(0, ph - h), std::min(KH, H + ph - h)};
    auto it = std::find(classes.begin(), classes.end(), valid);
    row_class[h] = int(it - classes.begin());
    if (it == classes.end()) classes.push_back(valid);
  }
  std::vector<int32_t>& fix = t->fix;
  fix.assign(classes.size() * O * W32, 0);
  for (size_t c = 0; c < classes.size(); ++c) {
    const auto [r0, r1] = classes[c];
    int last = -1;  // the column whose valid taps were computed last: columns in the middle share them
    for (int w = 0; w < W; ++w) {
      const int c0 = std::max(0, pw - w), c1 = std::min(KW, W + pw - w);
      if (r0 == 0 && r1 == KH && c0 == 0 && c1 == KW) continue;
      int32_t* column = fix.data() + c * O * W32 + w;
      if (last >= 0 && std::max(0, pw - last) == c0 && std::min(KW, W + pw - last) == c1) {
        for (int o = 0; o < O; ++o) column[o * W32] = column[o * W32 + last - w];
        continue;
      }
      last = w;
      const int32_t missing = full - (r1 - r0) * (c1 - c0) * C;
      for (int o = 0; o < O; ++o) {
        const int32_t* tap_popcount = wt.tap_popcount.data() + o * KH * KW;
        int32_t pad = 0;
        for (int i = 0; i < KH; ++i)
          for (int j = 0; j < KW; ++j)
            if (i < r0 || i >= r1 || j < c0 || j >= c1) pad += tap_popcount[i * KW + j];
        column[o * W32] = 2 * pad - missing;
      }
    }
  }
  return t;
}

// The fused path (Kernels::conv_row): per band of output rows, its input rows are packed once into
// the line layout, then each output row is computed with its epilogue in one pass. Pixels whose window
// reaches into the zero padding get an integer correction from a per-row-class table (see ConvRow).
void ConvKernel::ComputeRows(const Ort::KernelContext& ctx, const Args& a) const {
  const Kernels& isa = *isa_;
  const int C = int(channels_), H = a.h, W = a.w, KH = int(kh_), KW = int(kw_), O = int(a.wt.out_channels);
  const int ph = KH / 2, pw = KW / 2, words = int(Words(C));
  const ptrdiff_t plane = ptrdiff_t(H) * W, W32 = (W + 31) / 32 * 32, line = W32 + KW - 1;
  const int32_t full = KH * KW * C;
  const ptrdiff_t bytes = a.half ? 2 : 4;  // per activation
  const auto at = [bytes](const void* base, ptrdiff_t index) { return static_cast<const char*>(base) + index * bytes; };
  // The border correction tables, cached for the last image size when the weights are constant.
  std::shared_ptr<const RowTables> tables;
  {
    std::lock_guard<std::mutex> lock(tables_mutex_);
    if (tables_ && tables_->h == H && tables_->w == W && have_weights_) tables = tables_;
  }
  if (!tables) {
    tables = BuildRowTables(a.wt, H, W);
    if (have_weights_) {
      std::lock_guard<std::mutex> lock(tables_mutex_);
      tables_ = tables;
    }
  }
  const std::vector<int>& row_class = tables->row_class;
  const std::vector<std::pair<int, int>>& classes = tables->classes;
  const std::vector<int32_t>& fix = tables->fix;
  std::vector<ptrdiff_t> offset;  // step (i, j, k) of a window, or word s of a concatenated window
  if (a.wt.concat_steps) {
    for (int s = 0; s < a.wt.concat_steps; ++s) offset.push_back(s * line);
  } else {
    for (int i = 0; i < KH; ++i)
      for (int j = 0; j < KW; ++j)
        for (int k = 0; k < words; ++k) offset.push_back((ptrdiff_t(i) * words + k) * line + j);
  }
  // A float16 Y of 8 MB or more (64 channels at 256x256) is streamed past the cache: a 64->64 conv at 256x256
  // took 3% less time on Zen 5, while the 1.5 MB outputs of team01_efdn at 128x128 ran 3-4% faster end to
  // end with plain stores, which the next op finds in cache.
  const bool stream_half = a.half && a.n * O * plane * 2 >= (ptrdiff_t(8) << 20);
  // Bands of output rows, about 8 per image (at least 4 rows: each band packs KH - 1 extra rows; 32-row
  // bands of a 256-row image were faster than 16-row ones on Zen 5, 2 cores).
  const int band = std::clamp((H + 7) / 8, 4, 64);
  const int bands_per_image = (H + band - 1) / band;
  const size_t bands = size_t(a.n) * bands_per_image;
  std::vector<double> band_sums(a.channel_mean ? bands * O : 0, 0.0);  // [band][O]: for channel_mean
  std::atomic<bool> out_of_memory{false};
  auto run_band = [&](size_t b) {
    const int n = int(b / bands_per_image);
    const int h0 = int(b % bands_per_image) * band, h1 = std::min(H, h0 + band);
    thread_local std::vector<uint64_t> packed, window;
    thread_local std::vector<float> sums, spatial_row, lane_sums;
    try {
      lane_sums.assign(a.channel_mean ? size_t(O) * 16 : 0, 0.f);
      packed.assign(size_t(h1 - h0 + 2 * ph) * words * line, 0);
      window.resize(size_t(a.wt.concat_steps) * line);
      if (a.spatial_weight) {
        sums.resize(size_t(h1 - h0 + 2 * ph) * W);
        spatial_row.resize((W + 15) / 16 * 16);
      }
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
      return;
    }
    // Buffer row i holds image row h0 - ph + i: the band's rows are packed first, each channel streamed
    // through them (measured faster than packing each row just before it is needed).
    const char* xn = at(a.x, ptrdiff_t(n) * C * plane);
    const int r0 = std::max(0, h0 - ph), r1 = std::min(H, h1 + ph);
    uint64_t* lines = packed.data() + ptrdiff_t(r0 - h0 + ph) * words * line + pw;
    float* spatial_sums = a.spatial_weight ? sums.data() : nullptr;
    if (a.half) {
      isa.pack_lines_half(reinterpret_cast<const uint16_t*>(at(xn, ptrdiff_t(r0) * W)), plane, C, r1 - r0, W,
                          a.threshold, lines, line, a.spatial_weight, spatial_sums);
    } else {
      isa.pack_lines(reinterpret_cast<const float*>(at(xn, ptrdiff_t(r0) * W)), plane, C, r1 - r0, W, a.threshold,
                     lines, line, a.spatial_weight, spatial_sums);
    }
    for (int h = h0; h < h1; ++h) {
      const int cls = row_class[h];
      const bool inner = classes[cls] == std::pair<int, int>{0, KH};
      ConvRow row{};
      row.x = packed.data() + ptrdiff_t(h - h0) * words * line;
      row.line = line;
      row.offset = offset.data();
      row.steps = int(offset.size());
      row.width = W;
      row.out_channels = O;
      row.w = a.wt.rows.data();
      row.full = full;
      row.fix = fix.data() + size_t(cls) * O * W32;
      row.fix_ld = W32;
      row.fix_lo = inner ? pw : W;
      row.fix_hi = inner ? W - pw : W;
      row.scale = a.scale;
      row.bias = a.bias;
      row.channel = a.channel ? a.channel + ptrdiff_t(n) * O : nullptr;
      row.spatial = a.spatial ? a.spatial + n * plane + ptrdiff_t(h) * W : nullptr;
      row.skip = skip_ ? at(xn, ptrdiff_t(h) * W) : nullptr;
      row.plane = plane;
      row.residual = a.residual ? at(a.residual, ptrdiff_t(n) * O * plane + ptrdiff_t(h) * W) : nullptr;
      row.half = a.half;
      row.stream_half = stream_half;
      row.relu = relu_;
      row.slope = a.slope;
      row.y = const_cast<char*>(at(a.y, ptrdiff_t(n) * O * plane + ptrdiff_t(h) * W));
      // The next row's residual (else, with a skip, its X: the epilogue re-reads it) is fetched while this
      // row computes.
      const char* next = a.residual ? at(a.residual, ptrdiff_t(n) * O * plane) : skip_ ? xn : nullptr;
      const bool ahead = next && h + 1 < H;
      row.prefetch = ahead ? at(next, ptrdiff_t(h + 1) * W) : nullptr;
      row.prefetch_stride = plane * bytes;
      row.prefetch_rows = ahead ? O : 0;
      row.prefetch_bytes = int(W * bytes);
      row.concat_channels = a.wt.concat_steps ? C : 0;
      row.kh = KH;
      row.kw = KW;
      row.window = window.data();
      row.spatial_sum = a.spatial_weight ? sums.data() + ptrdiff_t(h - r0) * W : nullptr;
      row.spatial_bias = a.spatial_bias;
      row.spatial_row = spatial_row.data();
      row.channel_sums = a.channel_mean ? lane_sums.data() : nullptr;
      isa.conv_row(row);
    }
    for (int o = 0; o < O && a.channel_mean; ++o) {
      double sum = 0;
      for (int lane = 0; lane < 16; ++lane) sum += lane_sums[o * 16 + lane];
      band_sums[b * O + o] = sum;
    }
  };
  ParallelFor(ctx, bands, run_band);
  if (out_of_memory) throw std::bad_alloc();
  if (a.channel_mean) ReduceBandSums(band_sums, a.n, bands_per_image, O, plane, a.channel_mean);
}

// Registered twice, for X (and Y) float32 and for X (and Y) float16: onnxruntime picks the overload whose
// declared input types match the node, and takes Y's type from it.
template <ONNXTensorElementDataType kActivation>
struct BinaryConv2dOp : Ort::CustomOpBase<BinaryConv2dOp<kActivation>, ConvKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new ConvKernel(info); });
  }
  const char* GetName() const { return "BinaryConv2d"; }
  // X, threshold, weight, scale, bias?, spatial?, channel_scale?, residual?, prelu_slope?, spatial_weight?,
  // spatial_bias?
  size_t GetInputTypeCount() const { return 11; }
  // Any type but X's here: the kernel checks them (Node::CheckTypes) with a better message.
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? kActivation : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // Y, channel_mean? (float32)
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? kActivation : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

// ------------------------------------------------------------------------------------------------
// BinaryLinear
// ------------------------------------------------------------------------------------------------

// One token's outputs, vectorized over channels, same fp32 order as BinaryConv2d's epilogue.
template <bool kSpatial, bool kBias, bool kSkip>
void LinearEpilogue(int features, const int32_t* count, int n, const float* scale, const float* spatial,
                    const float* bias, const float* x, float* out) {
  for (int o = 0; o < n; ++o) {
    float t = float(features - 2 * count[o]) * scale[o];
    if (kSpatial) t *= *spatial;
    if (kBias) t += bias[o];
    if (kSkip) t += x[o];
    out[o] = t;
  }
}

using LinearEpilogueFn = void (*)(int, const int32_t*, int, const float*, const float*, const float*,
                                  const float*, float*);

LinearEpilogueFn SelectLinearEpilogue(bool spatial, bool bias, bool skip) {
  static const LinearEpilogueFn table[8] = {LinearEpilogue<0, 0, 0>, LinearEpilogue<0, 0, 1>, LinearEpilogue<0, 1, 0>,
                                            LinearEpilogue<0, 1, 1>, LinearEpilogue<1, 0, 0>, LinearEpilogue<1, 0, 1>,
                                            LinearEpilogue<1, 1, 0>, LinearEpilogue<1, 1, 1>};
  return table[spatial * 4 + bias * 2 + skip];
}

class LinearKernel {
 public:
  explicit LinearKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node_.prefix = "BinaryLinear node '" + info.GetNodeName() + "': ";
    node_.CheckTypes(info, {"X", "threshold", "weight", "scale", "bias", "spatial"});
    isa_ = &SelectOrFail(node_);
    features_ = node_.IntAttribute(info, "in_features", nullptr, 1, 1 << 24);
    const int64_t no_skip = 0;
    skip_ = node_.IntAttribute(info, "skip", &no_skip, 0, 1) == 1;
    int is_constant = 0;
    Ort::ConstValue w = info.GetTensorConstantInput(2, &is_constant);
    if (is_constant) {
      Node::Input in;
      in.shape = w.GetTensorTypeAndShapeInfo().GetShape();
      in.data = w.GetTensorRawData();
      weights_ = Prepare(in);
      have_weights_ = true;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) { return Guard([&] { Compute(context); }); }

 private:
  PreparedWeights Prepare(const Node::Input& w) const {
    PreparedWeights p = PrepareWeights(node_, *isa_, w, {Words(features_)},
                                       "packed sign bits, 64 input features per word", features_);
    if (skip_ && p.out_channels != features_)
      node_.Fail("skip = 1 needs out features == in_features = " + std::to_string(features_) +
                 ", weight has " + std::to_string(p.out_channels));
    return p;
  }

  void Compute(OrtKernelContext* context) const;

  Node node_;
  const Kernels* isa_ = nullptr;
  int64_t features_ = 0;
  bool skip_ = false;
  bool have_weights_ = false;
  PreparedWeights weights_;
};

void LinearKernel::Compute(OrtKernelContext* context) const {
  Ort::KernelContext ctx(context);
  const Node::Input x = node_.Get(ctx, 0);
  if (x.shape.size() < 2 || x.shape.back() != features_)
    node_.Fail("input 'X' must be float32 [..., K] (rank >= 2) with K = in_features = " +
               std::to_string(features_) + ", got " + ShapeString(x.shape));
  node_.Expect(node_.Get(ctx, 1), "threshold", {features_}, "float32 [K]");
  PreparedWeights local;
  if (!have_weights_) local = Prepare(node_.Get(ctx, 2));
  const PreparedWeights& wt = have_weights_ ? weights_ : local;
  const int64_t O = wt.out_channels;
  const Node::Input scale = node_.Get(ctx, 3), bias = node_.Get(ctx, 4), spatial = node_.Get(ctx, 5);
  node_.Expect(scale, "scale", {O}, "float32 [O]");
  if (bias.data) node_.Expect(bias, "bias", {O}, "float32 [O]");
  Shape out_shape = x.shape, spatial_shape = x.shape;
  out_shape.back() = O;
  spatial_shape.back() = 1;
  if (spatial.data) node_.Expect(spatial, "spatial", spatial_shape, "float32 [..., 1], one value per token");

  float* y = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();
  int64_t tokens = 1;
  for (size_t i = 0; i + 1 < x.shape.size(); ++i) tokens *= x.shape[i];
  if (tokens == 0) return;

  const Kernels& isa = *isa_;
  const int K = int(features_), words = int(Words(K));
  const ptrdiff_t unit = ptrdiff_t(words) * isa.words_per_word;
  std::vector<ptrdiff_t> x_offset(words);
  for (int k = 0; k < words; ++k) x_offset[k] = k * isa.words_per_word;
  const int O8 = int((O + 7) / 8 * 8);
  constexpr int TB = 64;  // tokens per task
  const int64_t blocks = (tokens + TB - 1) / TB;
  const auto* xf = static_cast<const float*>(x.data);
  const auto* thr = static_cast<const float*>(node_.Get(ctx, 1).data);
  const auto* scale_f = static_cast<const float*>(scale.data);
  const auto* bias_f = static_cast<const float*>(bias.data);
  const auto* spatial_f = static_cast<const float*>(spatial.data);
  const LinearEpilogueFn epilogue = SelectLinearEpilogue(spatial_f, bias_f, skip_);
  std::atomic<bool> out_of_memory{false};

  auto run_block = [&](size_t b) {
    const int64_t m0 = int64_t(b) * TB;
    const int nm = int(std::min<int64_t>(TB, tokens - m0));
    thread_local std::vector<uint64_t> packed;  // per-thread scratch, as in BinaryConv2d
    thread_local std::vector<int32_t> counts;
    try {
      packed.assign(TB * unit, 0);  // zero: bytes past K stay 0
      counts.resize(size_t(TB) * O8);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
      return;
    }
    isa.pack_tokens(xf + m0 * K, nm, K, thr, packed.data(), unit);
    isa.dot_tile(DotTile{packed.data(), unit, x_offset.data(), words, nm, wt.packed.data(), int(O), counts.data(),
                         O8, true});
    for (int i = 0; i < nm; ++i) {
      const float* sp = spatial_f ? spatial_f + m0 + i : nullptr;
      epilogue(K, counts.data() + i * O8, int(O), scale_f, sp, bias_f, xf + (m0 + i) * K, y + (m0 + i) * O);
    }
  };
  ParallelFor(ctx, size_t(blocks), run_block);
  if (out_of_memory) throw std::bad_alloc();
}

struct BinaryLinearOp : Ort::CustomOpBase<BinaryLinearOp, LinearKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new LinearKernel(info); });
  }
  const char* GetName() const { return "BinaryLinear"; }
  // X, threshold, weight, scale, bias?, spatial?
  size_t GetInputTypeCount() const { return 6; }
  // Any type here: the kernel checks them (Node::CheckTypes) with a better message.
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ------------------------------------------------------------------------------------------------
// ShuffleTaps: the end of an upsampler whose output conv was folded into the conv before the pixel
// shuffle (srbinarize/export/shuffle_fold.py). V holds, per tap t of the k x k output conv, colour o and
// sub-pixel phase, channel (t * O + o) * r^2 + phase (DepthToSpace CRD order); the op is
//   Y[n, o, P, Q] = sum_t M[n, t * O + o, P + dy_t - k/2, Q + dx_t - k/2],  M = DepthToSpace_r(V), 0 outside,
// the taps summed in order t = 0 .. k^2 - 1, as the standard-op form (Pad, Slice, Add) does. Per LR row and
// output phase each tap is a shifted LR row of one V plane, so the loops run over contiguous memory and
// the shuffled tensor is never written. V is float32, or uint8 codes with a scale and zero point (per tensor).
// ------------------------------------------------------------------------------------------------

class ShuffleTapsKernel {
 public:
  explicit ShuffleTapsKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node_.prefix = "ShuffleTaps node '" + info.GetNodeName() + "': ";
    r_ = node_.IntAttribute(info, "blocksize", nullptr, 1, 64);
    k_ = node_.IntAttribute(info, "kernel", nullptr, 1, 15);
    colours_ = node_.IntAttribute(info, "colours", nullptr, 1, 1 << 16);
    if (k_ % 2 == 0) node_.Fail("attribute 'kernel' must be odd, got " + std::to_string(k_));
    const auto type = info.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetElementType();
    codes_ = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (!codes_ && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      node_.Fail("input 'V' must be float32 or uint8 codes, got " + Node::TypeName(type));
    if (codes_ && info.GetInputCount() < 3)
      node_.Fail("uint8 input 'V' needs inputs 'scale' (float32) and 'zero_point' (uint8)");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard([&] { codes_ ? Compute<uint8_t>(context) : Compute<float>(context); });
  }

 private:
  template <class T>
  void Compute(OrtKernelContext* context) const;

  Node node_;
  int64_t r_ = 1, k_ = 1, colours_ = 1;
  bool codes_ = false;
};

template <class T>
void ShuffleTapsKernel::Compute(OrtKernelContext* context) const {
  Ort::KernelContext ctx(context);
  const Node::Input v = node_.Get(ctx, 0);
  const int64_t r = r_, k = k_, O = colours_, taps = k * k, half = k / 2;
  if (v.shape.size() != 4 || v.shape[1] != taps * O * r * r)
    node_.Fail("input 'V' must be [N, " + std::to_string(taps * O * r * r) + ", h, w] (kernel^2 x colours x " +
               "blocksize^2 channels), got " + ShapeString(v.shape));
  float scale = 1.0f, zero = 0.0f;
  if (codes_) {
    const Node::Input s = node_.Get(ctx, 1), z = node_.Get(ctx, 2);
    if (!s.data || !z.data || s.shape.size() > 1 || z.shape.size() > 1 ||
        (s.shape.size() == 1 && s.shape[0] != 1) || (z.shape.size() == 1 && z.shape[0] != 1))
      node_.Fail("inputs 'scale' and 'zero_point' must be scalars (one per tensor)");
    scale = *static_cast<const float*>(s.data);
    zero = float(*static_cast<const uint8_t*>(z.data));
  }
  const int64_t N = v.shape[0], h = v.shape[2], w = v.shape[3];
  float* y = ctx.GetOutput(0, Shape{N, O, h * r, w * r}).GetTensorMutableData<float>();
  if (N * h * w == 0) return;
  const T* vd = static_cast<const T*>(v.data);
  const int64_t plane = h * w;
  std::atomic<bool> out_of_memory{false};

  // One task: LR row i of colour o in image n, all r x r phases (r output rows).
  auto run_row = [&](size_t task) {
    const int64_t i = int64_t(task) % h, o = int64_t(task) / h % O, n = int64_t(task) / (h * O);
    thread_local std::vector<float> acc;
    try {
      acc.assign(size_t(r * r * w), 0.0f);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
      return;
    }
    for (int64_t a = 0; a < r; ++a)
      for (int64_t b = 0; b < r; ++b) {
        float* out = acc.data() + (a * r + b) * w;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t ey = a + t / k - half, ex = b + t % k - half;  // HR offset from phase (a, b)
          const int64_t sy = ey >= 0 ? ey / r : -((-ey + r - 1) / r), sx = ex >= 0 ? ex / r : -((-ex + r - 1) / r);
          const int64_t pa = ey - sy * r, pb = ex - sx * r, row = i + sy;
          if (row < 0 || row >= h) continue;
          const T* src = vd + (n * v.shape[1] + (t * O + o) * r * r + pa * r + pb) * plane + row * w;
          const int64_t j0 = std::max<int64_t>(0, -sx), j1 = std::min<int64_t>(w, w - sx);
          if constexpr (std::is_same_v<T, uint8_t>) {
            for (int64_t j = j0; j < j1; ++j) out[j] += (float(src[j + sx]) - zero) * scale;
          } else {
            for (int64_t j = j0; j < j1; ++j) out[j] += src[j + sx];
          }
        }
      }
    for (int64_t a = 0; a < r; ++a) {
      float* dst = y + ((n * O + o) * h * r + i * r + a) * (w * r);
      for (int64_t j = 0; j < w; ++j)
        for (int64_t b = 0; b < r; ++b) dst[j * r + b] = acc[(a * r + b) * w + j];
    }
  };
  ParallelFor(ctx, size_t(N * O * h), run_row);
  if (out_of_memory) throw std::bad_alloc();
}

struct ShuffleTapsOp : Ort::CustomOpBase<ShuffleTapsOp, ShuffleTapsKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new ShuffleTapsKernel(info); });
  }
  const char* GetName() const { return "ShuffleTaps"; }
  // V, scale? (uint8 V), zero_point? (uint8 V)
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace
}  // namespace srb

// Registers the "srbinarize" domain with a session's options (SessionOptions.register_custom_ops_library).
SRB_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {  // runtime older than the headers: report through the oldest API table
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "srbinarize: this onnxruntime is older than the headers the library was built with");
  }
  Ort::InitApi(api);
  static srb::BinaryConv2dOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> conv_op;
  static srb::BinaryConv2dOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> half_conv_op;
  static srb::BinaryLinearOp linear_op;
  static srb::ShuffleTapsOp shuffle_taps_op;
  // Domains must outlive every session that uses them: keep them until the library is unloaded.
  static std::vector<Ort::CustomOpDomain> domains;
  static std::mutex mutex;
  return srb::Guard([&] {
    Ort::CustomOpDomain domain(srb::kDomain);
    domain.Add(&conv_op);
    domain.Add(&half_conv_op);
    domain.Add(&linear_op);
    domain.Add(&shuffle_taps_op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  });
}

// The kernel path sessions created now would use (honouring SRBINARIZE_KERNEL), or why none can be
// used, written to buf; returns 0 on success, 1 on error. For srbinarize.runtime.kernel_path().
SRB_EXPORT int srbinarize_kernel_path(char* buf, size_t size) {
  std::string error;
  const srb::Kernels* k = srb::SelectKernels(&error);
  const std::string text = k ? k->name : error;
  std::snprintf(buf, size, "%s", text.c_str());
  return k ? 0 : 1;
}

// Whether this CPU can run the named kernel path (avx512, avx2, scalar).
SRB_EXPORT int srbinarize_kernel_supported(const char* name) {
  for (const srb::Kernels* k : {&srb::kAvx512Kernels, &srb::kAvx2Kernels, &srb::kScalarKernels})
    if (std::strcmp(name, k->name) == 0) return srb::KernelsSupported(*k);
  return 0;
}
