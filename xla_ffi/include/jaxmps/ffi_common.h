// Shared by every jaxmps FFI library (CPU, CUDA, Metal host): the one dtype-dispatch helper,
// the one argument-check/error helper, and the one way to register an FFI target.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxmps {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------------------------
// Errors. Every message starts with "jaxmps.<op>:" so a user can tell which op rejected what.
// ---------------------------------------------------------------------------------------------

// Message parts are appended without iostreams: a library linked with a static libstdc++ (the
// GPU host's gcc 13 toolchain does this) crashed formatting through std::ostringstream.
inline void MessagePart(std::string& out, std::string_view s) { out.append(s); }
inline void MessagePart(std::string& out, const char* s) { out.append(s); }
inline void MessagePart(std::string& out, const std::string& s) { out.append(s); }
inline void MessagePart(std::string& out, char c) { out.push_back(c); }
template <typename N, std::enable_if_t<std::is_arithmetic_v<N>, int> = 0>
inline void MessagePart(std::string& out, N n) {
  out += std::to_string(n);
}

template <typename... Parts>
std::string Message(std::string_view op, const Parts&... parts) {
  std::string out = "jaxmps.";
  out.append(op);
  out.append(": ");
  (MessagePart(out, parts), ...);
  return out;
}

template <typename... Parts>
ffi::Error InvalidArgument(std::string_view op, const Parts&... parts) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, Message(op, parts...));
}

template <typename... Parts>
ffi::Error Internal(std::string_view op, const Parts&... parts) {
  return ffi::Error(ffi::ErrorCode::kInternal, Message(op, parts...));
}

#define JAXMPS_RETURN_IF_ERROR(expr)        \
  do {                                      \
    ::xla::ffi::Error jaxmps_err_ = (expr); \
    if (jaxmps_err_.failure()) {            \
      return jaxmps_err_;                   \
    }                                       \
  } while (0)

inline std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  out += dims.size() == 1 ? ",)" : ")";
  return out;
}

inline std::string_view DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    default: return "a non-float dtype";
  }
}

// Checks that `buffer` (argument `arg` of `op`) has exactly the shape `expected`.
inline ffi::Error CheckShape(std::string_view op, std::string_view arg,
                             const ffi::AnyBuffer& buffer, std::vector<int64_t> expected) {
  auto dims = buffer.dimensions();
  bool same = dims.size() == expected.size();
  for (size_t i = 0; same && i < expected.size(); ++i) same = dims[i] == expected[i];
  if (!same) {
    return InvalidArgument(op, arg, " must have shape ",
                           ShapeString(ffi::Span<const int64_t>(expected.data(), expected.size())),
                           ", got ", ShapeString(dims));
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckRank(std::string_view op, std::string_view arg,
                            const ffi::AnyBuffer& buffer, size_t rank) {
  if (buffer.dimensions().size() != rank) {
    return InvalidArgument(op, arg, " must have rank ", rank, ", got shape ",
                           ShapeString(buffer.dimensions()));
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckDtype(std::string_view op, std::string_view arg,
                             const ffi::AnyBuffer& buffer, ffi::DataType expected) {
  if (buffer.element_type() != expected) {
    return InvalidArgument(op, arg, " must have dtype ", DtypeName(expected), ", got ",
                           DtypeName(buffer.element_type()));
  }
  return ffi::Error::Success();
}

// Parameters and statistics are float32 for float16/bfloat16/float32 data, as in MPS, and
// float64 for float64 data.
inline ffi::DataType ParamDtype(ffi::DataType data) {
  return data == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

// Checks parameter/statistics buffers (gamma, beta, mean, ...): each must have `shape` and the
// parameter dtype of `data` (float32, or float64 for float64 data).
inline ffi::Error CheckParams(
    std::string_view op, ffi::DataType data,
    std::initializer_list<std::pair<std::string_view, const ffi::AnyBuffer*>> params,
    std::vector<int64_t> shape) {
  for (auto [name, buffer] : params) {
    JAXMPS_RETURN_IF_ERROR(CheckShape(op, name, *buffer, shape));
    JAXMPS_RETURN_IF_ERROR(CheckDtype(op, name, *buffer, ParamDtype(data)));
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Dtype dispatch. `f` receives a DtypeTag<dt>; each backend maps the tag to its own storage
// type (CPU: float/double/jaxmps::Half/jaxmps::BFloat16, CUDA: __half/__nv_bfloat16, ...).
// ---------------------------------------------------------------------------------------------

template <ffi::DataType dt>
struct DtypeTag {
  static constexpr ffi::DataType value = dt;
};

// Which float dtypes a backend implements.
struct DtypeSet {
  bool f16 = true, bf16 = true, f32 = true, f64 = true;
};

template <typename F>
ffi::Error DispatchFloat(std::string_view op, std::string_view arg, ffi::DataType dtype,
                         DtypeSet allowed, F&& f) {
  switch (dtype) {
    case ffi::DataType::F32:
      if (allowed.f32) return f(DtypeTag<ffi::DataType::F32>{});
      break;
    case ffi::DataType::F64:
      if (allowed.f64) return f(DtypeTag<ffi::DataType::F64>{});
      break;
    case ffi::DataType::F16:
      if (allowed.f16) return f(DtypeTag<ffi::DataType::F16>{});
      break;
    case ffi::DataType::BF16:
      if (allowed.bf16) return f(DtypeTag<ffi::DataType::BF16>{});
      break;
    default:
      break;
  }
  return InvalidArgument(op, arg, " has unsupported dtype ", DtypeName(dtype),
                         " on this backend");
}

// ---------------------------------------------------------------------------------------------
// Layout attribute: every kernel takes `channels_last` (1 = NHWC, 0 = NCHW) and works on both
// natively; Nchw4 gives the (N, C, H, W) sizes and strides of a 4-d image buffer.
// ---------------------------------------------------------------------------------------------

struct ImageShape {
  int64_t n = 0, c = 0, h = 0, w = 0;
  bool channels_last = true;
  // Element strides of the four logical axes.
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
  int64_t pixels() const { return h * w; }
  int64_t size() const { return n * c * h * w; }
};

inline ffi::Error ReadImageShape(std::string_view op, std::string_view arg,
                                 const ffi::AnyBuffer& buffer, bool channels_last,
                                 ImageShape* shape) {
  JAXMPS_RETURN_IF_ERROR(CheckRank(op, arg, buffer, 4));
  auto d = buffer.dimensions();
  ImageShape s;
  s.channels_last = channels_last;
  s.n = d[0];
  if (channels_last) {
    s.h = d[1], s.w = d[2], s.c = d[3];
    s.sc = 1, s.sw = s.c, s.sh = s.w * s.c, s.sn = s.h * s.w * s.c;
  } else {
    s.c = d[1], s.h = d[2], s.w = d[3];
    s.sw = 1, s.sh = s.w, s.sc = s.h * s.w, s.sn = s.c * s.h * s.w;
  }
  *shape = s;
  return ffi::Error::Success();
}

// Checks `buffer` has the same shape and dtype as the image `like` (e.g. dy vs x).
inline ffi::Error CheckSameAs(std::string_view op, std::string_view arg,
                              const ffi::AnyBuffer& buffer, std::string_view like_name,
                              const ffi::AnyBuffer& like) {
  auto a = buffer.dimensions(), b = like.dimensions();
  bool same = a.size() == b.size();
  for (size_t i = 0; same && i < a.size(); ++i) same = a[i] == b[i];
  if (!same) {
    return InvalidArgument(op, arg, " must have the shape of ", like_name, " ",
                           ShapeString(b), ", got ", ShapeString(a));
  }
  if (buffer.element_type() != like.element_type()) {
    return InvalidArgument(op, arg, " must have the dtype of ", like_name, " (",
                           DtypeName(like.element_type()), "), got ",
                           DtypeName(buffer.element_type()));
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Target registry: each library keeps a table of (target name, handler) filled by
// JAXMPS_FFI_TARGET at load time and exported through the C functions in registry.cc, so
// Python registers whatever a library holds without knowing symbol names.
// ---------------------------------------------------------------------------------------------

struct TargetEntry {
  const char* name;
  XLA_FFI_Handler* handler;
};

std::vector<TargetEntry>& TargetTable();

inline bool RegisterTarget(const char* name, XLA_FFI_Handler* handler) {
  TargetTable().push_back({name, handler});
  return true;
}

}  // namespace jaxmps

// Defines the handler symbol `Symbol` from `Impl` and `Binding` and lists it under `name`.
#define JAXMPS_FFI_TARGET(name, Symbol, Impl, Binding)                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Symbol, Impl, Binding);                 \
  [[maybe_unused]] static const bool Symbol##_registered_ =             \
      ::jaxmps::RegisterTarget(name, Symbol)
