// oneDNN convolutions as XLA FFI custom calls (CPU, float32, NHWC activations, HWIO kernels).
//
// Three handlers, one per pass of a 2-D convolution: forward, input gradient, weight gradient.
// Activations stay NHWC, so oneDNN reads and writes XLA's buffers in place; only the kernel
// (or its gradient) is reordered between XLA's HWIO and the blocked layout oneDNN's kernels
// prefer. Primitives are built once per shape and kept; every call runs under one lock,
// because each oneDNN call already uses all cores (two calls at once would oversubscribe them).
//
// Scratchpads are the caller's (scratchpad_mode::user): one buffer, grown to the largest need
// and passed to every execution. oneDNN's own ("library") scratchpad is a thread_local buffer
// sized on the thread that *creates* a primitive, while XLA runs a custom call on whichever of
// its threads is free: executed elsewhere, a primitive that needs a scratchpad (the im2col
// buffer of the gemm-based weight gradient) writes through another thread's smaller or null
// buffer. See benchmarks/NOTES.md, "The crash on AVX2 hosts: root cause, fix, check".
//
// The window attribute is {stride_h, stride_w, pad_top, pad_left}; the bottom/right padding
// oneDNN needs is implied by the shapes (the part of XLA's padding that a window reaches).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

constexpr auto kF32 = memory::data_type::f32;

struct Geometry {
  int64_t n, c, h, w;      // input NHWC
  int64_t o, kh, kw;       // kernel HWIO
  int64_t oh, ow;          // output
  int64_t sh, sw, pt, pl;  // strides, top/left padding
  int64_t pb() const { return (oh - 1) * sh + kh - h - pt; }
  int64_t pr() const { return (ow - 1) * sw + kw - w - pl; }
  std::string Key(const char* pass) const {
    std::string k(pass);
    for (int64_t v : {n, c, h, w, o, kh, kw, oh, ow, sh, sw, pt, pl}) k += "," + std::to_string(v);
    return k;
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, kF32, Tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, oh, ow}, kF32, Tag::nhwc); }
  memory::desc UserWeights() const { return memory::desc({o, c, kh, kw}, kF32, Tag::hwio); }
  memory::desc AnyWeights() const { return memory::desc({o, c, kh, kw}, kF32, Tag::any); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb(), pr()}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::mutex& Lock() {
  static std::mutex mu;
  return mu;
}

// Page-aligned bytes that only grow (oneDNN's jit kernels expect aligned buffers).
class AlignedBuffer {
 public:
  void* Reserve(size_t bytes) {
    if (bytes > size_) {
      size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
      void* data = std::aligned_alloc(kAlign, rounded);
      if (data == nullptr) throw std::bad_alloc();
      data_.reset(data);
      size_ = rounded;
    }
    return data_.get();
  }

 private:
  static constexpr size_t kAlign = 4096;
  struct Free { void operator()(void* p) const { std::free(p); } };
  std::unique_ptr<void, Free> data_;
  size_t size_ = 0;
};

// Used under Lock() only, by one execution at a time.
AlignedBuffer& Scratchpad() {
  static AlignedBuffer buffer;
  return buffer;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// One pass of one convolution shape: the primitive and the reorder of its kernel-shaped operand
// between XLA's HWIO and the primitive's layout (none when they agree).
struct Plan {
  dnnl::primitive conv;
  memory::desc kernel_desc;       // the primitive's layout of the kernel or its gradient
  dnnl::primitive kernel_reorder; // HWIO -> primitive (fwd, bwd_data) or back (bwd_weights)
  bool reorder = false;
  AlignedBuffer kernel_buffer;
  memory::desc conv_scratchpad, reorder_scratchpad;
};

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Src(),
      g.AnyWeights(), g.Dst(), g.Strides(), g.PadL(), g.PadR(), UserScratchpad());
}

void SetReorder(Plan& plan, const memory::desc& chosen, const memory::desc& user, bool to_user) {
  plan.kernel_desc = chosen;
  plan.reorder = chosen != user;
  if (plan.reorder) {
    plan.kernel_buffer.Reserve(chosen.get_size());
    auto pd = to_user
        ? dnnl::reorder::primitive_desc(Engine(), chosen, Engine(), user, UserScratchpad())
        : dnnl::reorder::primitive_desc(Engine(), user, Engine(), chosen, UserScratchpad());
    plan.reorder_scratchpad = pd.scratchpad_desc();
    plan.kernel_reorder = dnnl::reorder(pd);
  }
}

enum class Pass { kForward, kBackwardData, kBackwardWeights };

// The primitive descriptor of one pass: which implementation oneDNN picks for it, and the
// layouts and scratchpad that implementation wants.
dnnl::primitive_desc PassDesc(Pass pass, const Geometry& g) {
  auto fwd = ForwardDesc(g);
  if (pass == Pass::kForward) return fwd;
  if (pass == Pass::kBackwardData) {
    return dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
        g.Strides(), g.PadL(), g.PadR(), fwd, UserScratchpad());
  }
  return dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.AnyWeights(), g.Dst(),
      g.Strides(), g.PadL(), g.PadR(), fwd, UserScratchpad());
}

Plan& GetPlan(Pass pass, const Geometry& g) {
  static std::unordered_map<std::string, std::unique_ptr<Plan>> plans;
  static const char* names[] = {"fwd", "bwd_data", "bwd_weights"};
  std::string key = g.Key(names[static_cast<int>(pass)]);
  auto it = plans.find(key);
  if (it != plans.end()) return *it->second;
  auto plan = std::make_unique<Plan>();
  dnnl::primitive_desc pd = PassDesc(pass, g);
  plan->conv = dnnl::primitive(pd);
  plan->conv_scratchpad = pd.scratchpad_desc();
  if (pass == Pass::kBackwardWeights) {
    SetReorder(*plan, pd.diff_weights_desc(), g.UserWeights(), /*to_user=*/true);
  } else {
    SetReorder(*plan, pd.weights_desc(), g.UserWeights(), /*to_user=*/false);
  }
  return *(plans[key] = std::move(plan));
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "onednn_conv: " + what);
}

// Shapes: x (N, H, W, C), kernel (KH, KW, C, O), y (N, OH, OW, O).
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                        ffi::Span<const int64_t> y, ffi::Span<const int64_t> window,
                        Geometry* g) {
  if (x.size() != 4 || k.size() != 4 || y.size() != 4) return Invalid("expected rank-4 operands");
  if (window.size() != 4) return Invalid("window must be {stride_h, stride_w, pad_top, pad_left}");
  *g = Geometry{x[0], x[3], x[1], x[2], k[3], k[0], k[1], y[1], y[2],
                window[0], window[1], window[2], window[3]};
  if (k[2] != x[3] || y[0] != x[0] || y[3] != k[3]) return Invalid("inconsistent shapes");
  if (g->pb() < 0 || g->pr() < 0) return Invalid("output larger than the padded input allows");
  return ffi::Error::Success();
}

// Time spent in each pass (nanoseconds) and calls, for profiling: GjOnednnStats.
int64_t pass_nanos[3] = {0, 0, 0};
int64_t pass_calls[3] = {0, 0, 0};

ffi::Error Run(Pass pass, const Geometry& g, float* src, float* kernel, float* dst) {
  try {
    std::lock_guard<std::mutex> hold(Lock());
    auto start = std::chrono::steady_clock::now();
    Plan& plan = GetPlan(pass, g);
    dnnl::stream stream(Engine());
    memory src_mem(g.Src(), Engine(), src);
    memory dst_mem(g.Dst(), Engine(), dst);
    memory user_kernel(g.UserWeights(), Engine(), kernel);
    memory kernel_mem = plan.reorder
        ? memory(plan.kernel_desc, Engine(), plan.kernel_buffer.Reserve(0)) : user_kernel;
    void* scratch = Scratchpad().Reserve(
        std::max(plan.conv_scratchpad.get_size(), plan.reorder_scratchpad.get_size()));
    // Executes `primitive` with `args` and, where it needs one, the shared scratchpad.
    auto execute = [&](dnnl::primitive& primitive, const memory::desc& scratchpad,
                       std::unordered_map<int, memory> args) {
      if (scratchpad.get_size() > 0) args[DNNL_ARG_SCRATCHPAD] = memory(scratchpad, Engine(), scratch);
      primitive.execute(stream, args);
    };
    auto reorder = [&](const memory& from, const memory& to) {
      execute(plan.kernel_reorder, plan.reorder_scratchpad, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
    };
    if (pass == Pass::kForward) {
      if (plan.reorder) reorder(user_kernel, kernel_mem);
      execute(plan.conv, plan.conv_scratchpad, {{DNNL_ARG_SRC, src_mem},
              {DNNL_ARG_WEIGHTS, kernel_mem}, {DNNL_ARG_DST, dst_mem}});
    } else if (pass == Pass::kBackwardData) {
      if (plan.reorder) reorder(user_kernel, kernel_mem);
      execute(plan.conv, plan.conv_scratchpad, {{DNNL_ARG_DIFF_SRC, src_mem},
              {DNNL_ARG_WEIGHTS, kernel_mem}, {DNNL_ARG_DIFF_DST, dst_mem}});
    } else {
      execute(plan.conv, plan.conv_scratchpad, {{DNNL_ARG_SRC, src_mem},
              {DNNL_ARG_DIFF_WEIGHTS, kernel_mem}, {DNNL_ARG_DIFF_DST, dst_mem}});
      if (plan.reorder) reorder(kernel_mem, user_kernel);
    }
    stream.wait();
    int p = static_cast<int>(pass);
    pass_nanos[p] += std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - start).count();
    pass_calls[p] += 1;
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "onednn_conv: out of memory");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> window) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), window, &g);
      e.failure()) return e;
  return Run(Pass::kForward, g, x.typed_data(), kernel.typed_data(), y->typed_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> window) {
  Geometry g;
  if (auto e = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), window, &g);
      e.failure()) return e;
  return Run(Pass::kBackwardData, g, dx->typed_data(), kernel.typed_data(), dy.typed_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dkernel, ffi::Span<const int64_t> window) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), dkernel->dimensions(), dy.dimensions(), window, &g);
      e.failure()) return e;
  return Run(Pass::kBackwardWeights, g, x.typed_data(), dkernel->typed_data(), dy.typed_data());
}

// Every pass takes two float32 operands and the window attribute and returns one array.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("window");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GjOnednnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GjOnednnConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GjOnednnConvBackwardWeights, BackwardWeights, Binding());

// Copies {forward, backward_data, backward_weights} nanoseconds then calls into out[6]; resets
// the counters when reset != 0.
extern "C" void GjOnednnStats(int64_t* out, int reset) {
  std::lock_guard<std::mutex> hold(Lock());
  for (int i = 0; i < 3; ++i) {
    out[i] = pass_nanos[i];
    out[3 + i] = pass_calls[i];
    if (reset) pass_nanos[i] = pass_calls[i] = 0;
  }
}

extern "C" int GjOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Writes the name of the implementation oneDNN picks for `pass` (0 forward, 1 input gradient,
// 2 weight gradient) of the convolution `geometry` = {n, c, h, w, o, kh, kw, oh, ow, sh, sw,
// pad_top, pad_left} into out[len]; returns 0, or -1 when oneDNN has none for it.
extern "C" int GjOnednnImplementation(int pass, const int64_t* geometry, char* out, int len) {
  const int64_t* v = geometry;
  Geometry g{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12]};
  try {
    std::lock_guard<std::mutex> hold(Lock());
    std::string name = PassDesc(static_cast<Pass>(pass), g).impl_info_str();
    std::snprintf(out, len, "%s", name.c_str());
  } catch (const dnnl::error&) {
    return -1;
  }
  return 0;
}
