// onnxruntime custom ops of the "srbinarize" domain: BinaryConv2d and BinaryLinear (see README.md).
//
// Built against the onnxruntime C/C++ API headers only: the library gets the API table from
// RegisterCustomOps' OrtApiBase (ORT_API_MANUAL_INIT) and does not link libonnxruntime.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "dispatch.h"

#define SRB_EXPORT extern "C" __attribute__((visibility("default")))

namespace srb {
namespace {

constexpr const char* kDomain = "srbinarize";
constexpr int kMaxTasks = 64;  // work is split into at most this many ParallelFor tasks

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

  // Element types are checked here rather than declared in the op schema, so that a wrong one gets
  // an error saying what was expected. Absent optional inputs have an empty name.
  void CheckTypes(const Ort::ConstKernelInfo& info, const std::vector<const char*>& names) const {
    for (size_t i = 0; i < info.GetInputCount() && i < names.size(); ++i) {
      if (info.GetInputName(i).empty()) continue;
      const auto type = info.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
      const auto expected = i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
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

// Packed weights in the layout of one kernel implementation, plus (convolutions) the correction
// for taps that fall into the zero padding: the kernels treat a padded tap as an all-zero word,
// which adds popcount(w) to sum popcount(x ^ w); a padded tap must contribute 0 to the dot product,
// so pad_fix[o, tap] = 2 * popcount(w[o, tap]) - C is added to (taps * C - 2 * sum) per padded tap.
struct PreparedWeights {
  int64_t out_channels = 0;
  std::vector<uint64_t> packed;
  std::vector<int32_t> pad_fix;  // [O][taps]
};

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
  const int64_t ntaps = steps / words;
  p.pad_fix.resize(p.out_channels * ntaps);
  for (int64_t t = 0; t < p.out_channels * ntaps; ++t) {
    int32_t pop = 0;
    for (int64_t k = 0; k < words; ++k) pop += __builtin_popcountll(data[t * words + k]);
    p.pad_fix[t] = 2 * pop - int32_t(channels);
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

class ConvKernel {
 public:
  explicit ConvKernel(const OrtKernelInfo* raw_info) {
    Ort::ConstKernelInfo info(raw_info);
    node_.prefix = "BinaryConv2d node '" + info.GetNodeName() + "': ";
    node_.CheckTypes(info, {"X", "threshold", "weight", "scale", "bias", "spatial", "channel_scale"});
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
    channels_ = node_.IntAttribute(info, "in_channels", nullptr, 1, 1 << 20);
    const int64_t no_skip = 0;
    skip_ = node_.IntAttribute(info, "skip", &no_skip, 0, 1) == 1;
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

  Node node_;
  const Kernels* isa_ = nullptr;
  int64_t kh_ = 0, kw_ = 0, channels_ = 0;
  bool skip_ = false;
  bool have_weights_ = false;
  PreparedWeights weights_;
};

void ConvKernel::Compute(OrtKernelContext* context) const {
  Ort::KernelContext ctx(context);
  const Node::Input x = node_.Get(ctx, 0);
  if (x.shape.size() != 4 || x.shape[1] != channels_)
    node_.Fail("input 'X' must be float32 [N, C, H, W] with C = in_channels = " +
               std::to_string(channels_) + ", got " + ShapeString(x.shape));
  const int64_t n_images = x.shape[0], h_in = x.shape[2], w_in = x.shape[3];
  if (n_images > INT_MAX || h_in > INT_MAX || w_in > INT_MAX) node_.Fail("input 'X' is too large");
  node_.Expect(node_.Get(ctx, 1), "threshold", {channels_}, "float32 [C]");
  PreparedWeights local;
  if (!have_weights_) local = Prepare(node_.Get(ctx, 2));
  const PreparedWeights& wt = have_weights_ ? weights_ : local;
  const int64_t O = wt.out_channels;
  const Node::Input scale = node_.Get(ctx, 3), bias = node_.Get(ctx, 4), spatial = node_.Get(ctx, 5),
                    chan = node_.Get(ctx, 6);
  node_.Expect(scale, "scale", {O}, "float32 [O]");
  if (bias.data) node_.Expect(bias, "bias", {O}, "float32 [O]");
  if (spatial.data) node_.Expect(spatial, "spatial", {n_images, 1, h_in, w_in}, "float32 [N, 1, H, W]");
  if (chan.data) node_.Expect(chan, "channel_scale", {n_images, O}, "float32 [N, O]");

  float* y = ctx.GetOutput(0, {n_images, O, h_in, w_in}).GetTensorMutableData<float>();
  if (n_images * h_in * w_in == 0) return;

  const Kernels& isa = *isa_;
  const int C = int(channels_), H = int(h_in), W = int(w_in), KH = int(kh_), KW = int(kw_);
  const int ph = KH / 2, pw = KW / 2, Hp = H + 2 * ph, Wp = W + 2 * pw;
  const ptrdiff_t unit = Words(C) * isa.words_per_word;  // packed words per pixel
  const ptrdiff_t plane = ptrdiff_t(H) * W;
  const auto* xf = static_cast<const float*>(x.data);
  const auto* thr = static_cast<const float*>(node_.Get(ctx, 1).data);

  // 1. Binarize and pack X into a zero-bordered NHWC bit image (one unit per pixel).
  std::vector<uint64_t> packed(size_t(n_images) * Hp * Wp * unit);
  auto pack_row = [&](size_t r) {
    const ptrdiff_t n = r / H, h = r % H;
    isa.pack_planar(xf + n * C * plane + h * W, plane, C, W, thr,
                    packed.data() + ((n * Hp + h + ph) * Wp + pw) * unit, unit);
  };
  ParallelFor(ctx, size_t(n_images) * H, pack_row);

  // 2. Per output row: popcounts for tiles of TW pixels x all channels, exact border, epilogue.
  const int steps = KH * KW * int(Words(C));
  std::vector<ptrdiff_t> x_offset(steps);
  for (int t = 0, s = 0; t < KH * KW; ++t)
    for (int k = 0; k < Words(C); ++k) x_offset[s++] = ((t / KW) * Wp + t % KW) * unit + k * isa.words_per_word;
  const int O8 = int((O + 7) / 8 * 8);
  const int TW = O8 <= 128 ? 64 : std::max(8, 8192 / O8 / 8 * 8);  // counts tile stays in L1
  const size_t rows = size_t(n_images) * H, tasks = std::min<size_t>(rows, kMaxTasks);
  std::vector<int32_t> counts_all(tasks * O8 * TW);
  std::vector<float> tmp_all(tasks * TW);
  const auto* scale_f = static_cast<const float*>(scale.data);
  const auto* bias_f = static_cast<const float*>(bias.data);
  const auto* spatial_f = static_cast<const float*>(spatial.data);
  const auto* chan_f = static_cast<const float*>(chan.data);
  const int32_t full = KH * KW * C;
  const int taps = KH * KW;

  auto run_task = [&](size_t task) {
    int32_t* counts = counts_all.data() + task * O8 * TW;
    float* t = tmp_all.data() + task * TW;
    for (size_t r = task * rows / tasks; r < (task + 1) * rows / tasks; ++r) {
      const ptrdiff_t n = r / H;
      const int h = int(r % H);
      const bool border_row = h < ph || h >= H - ph;
      for (int p0 = 0; p0 < W; p0 += TW) {
        const int np = std::min(TW, W - p0);
        DotTile tile{packed.data() + ((n * Hp + h) * Wp + p0) * unit, unit, x_offset.data(), steps,
                     np, wt.packed.data(), int(O), counts, TW, false};
        isa.dot_tile(tile);
        // Padded taps of pixel p0 + p: fix its dot product (see PreparedWeights).
        auto fix = [&](int32_t* dot, const int32_t* pad_fix, int p) {
          const int w = p0 + p;
          for (int i = 0; i < KH; ++i)
            for (int j = 0; j < KW; ++j) {
              const int hi = h + i - ph, wj = w + j - pw;
              if (hi < 0 || hi >= H || wj < 0 || wj >= W) dot[p] += pad_fix[i * KW + j];
            }
        };
        for (int o = 0; o < O; ++o) {
          int32_t* dot = counts + o * TW;
          for (int p = 0; p < np; ++p) dot[p] = full - 2 * dot[p];
          const int32_t* pad_fix = wt.pad_fix.data() + o * taps;
          if (border_row) {
            for (int p = 0; p < np; ++p) fix(dot, pad_fix, p);
          } else {
            const int left_end = std::max(0, std::min(np, pw - p0));  // pixels w < pw
            for (int p = 0; p < left_end; ++p) fix(dot, pad_fix, p);
            for (int p = std::max(left_end, W - pw - p0); p < np; ++p) fix(dot, pad_fix, p);  // w >= W - pw
          }
          // Epilogue, in the order the PyTorch layer computes it.
          const float s = scale_f[o];
          for (int p = 0; p < np; ++p) t[p] = float(dot[p]) * s;
          if (spatial_f) {
            const float* sp = spatial_f + (n * H + h) * ptrdiff_t(W) + p0;
            for (int p = 0; p < np; ++p) t[p] *= sp[p];
          }
          if (chan_f) {
            const float c = chan_f[n * O + o];
            for (int p = 0; p < np; ++p) t[p] *= c;
          }
          if (bias_f) {
            const float b = bias_f[o];
            for (int p = 0; p < np; ++p) t[p] += b;
          }
          float* out = y + (n * O + o) * plane + ptrdiff_t(h) * W + p0;
          if (skip_) {
            const float* xs = xf + (n * C + o) * plane + ptrdiff_t(h) * W + p0;
            for (int p = 0; p < np; ++p) out[p] = t[p] + xs[p];
          } else {
            std::memcpy(out, t, np * sizeof(float));
          }
        }
      }
    }
  };
  ParallelFor(ctx, tasks, run_task);
}

struct BinaryConv2dOp : Ort::CustomOpBase<BinaryConv2dOp, ConvKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] { *kernel = new ConvKernel(info); });
  }
  const char* GetName() const { return "BinaryConv2d"; }
  // X, threshold, weight, scale, bias?, spatial?, channel_scale?
  size_t GetInputTypeCount() const { return 7; }
  // Any type here: the kernel checks them (Node::CheckTypes) with a better message.
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ------------------------------------------------------------------------------------------------
// BinaryLinear
// ------------------------------------------------------------------------------------------------

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
  constexpr int TB = 64;  // tokens per block
  const int64_t blocks = (tokens + TB - 1) / TB;
  const size_t tasks = size_t(std::min<int64_t>(blocks, kMaxTasks));
  std::vector<uint64_t> packed_all(tasks * TB * unit);  // zero: bytes past K stay 0
  std::vector<int32_t> counts_all(tasks * TB * O8);
  const auto* xf = static_cast<const float*>(x.data);
  const auto* thr = static_cast<const float*>(node_.Get(ctx, 1).data);
  const auto* scale_f = static_cast<const float*>(scale.data);
  const auto* bias_f = static_cast<const float*>(bias.data);
  const auto* spatial_f = static_cast<const float*>(spatial.data);

  auto run_task = [&](size_t task) {
    uint64_t* packed = packed_all.data() + task * TB * unit;
    int32_t* counts = counts_all.data() + task * TB * O8;
    for (int64_t b = task * blocks / tasks; b < int64_t((task + 1) * blocks / tasks); ++b) {
      const int64_t m0 = b * TB;
      const int nm = int(std::min<int64_t>(TB, tokens - m0));
      isa.pack_tokens(xf + m0 * K, nm, K, thr, packed, unit);
      isa.dot_tile(DotTile{packed, unit, x_offset.data(), words, nm, wt.packed.data(), int(O),
                           counts, O8, true});
      for (int i = 0; i < nm; ++i) {
        const int32_t* c = counts + i * O8;
        float* out = y + (m0 + i) * O;
        for (int o = 0; o < O; ++o) out[o] = float(K - 2 * c[o]) * scale_f[o];
        if (spatial_f) {
          const float sp = spatial_f[m0 + i];
          for (int o = 0; o < O; ++o) out[o] *= sp;
        }
        if (bias_f)
          for (int o = 0; o < O; ++o) out[o] += bias_f[o];
        if (skip_) {
          const float* xs = xf + (m0 + i) * K;
          for (int o = 0; o < O; ++o) out[o] += xs[o];
        }
      }
    }
  };
  ParallelFor(ctx, tasks, run_task);
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
  static srb::BinaryConv2dOp conv_op;
  static srb::BinaryLinearOp linear_op;
  // Domains must outlive every session that uses them: keep them until the library is unloaded.
  static std::vector<Ort::CustomOpDomain> domains;
  static std::mutex mutex;
  return srb::Guard([&] {
    Ort::CustomOpDomain domain(srb::kDomain);
    domain.Add(&conv_op);
    domain.Add(&linear_op);
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
