// The C entry points every jaxmps library exports (and nothing else): its target table, the
// FFI API version its handlers were compiled against, and a build description.
#include "jaxmps/ffi_common.h"

#define JAXMPS_EXPORT extern "C" __attribute__((visibility("default")))

namespace jaxmps {
std::vector<TargetEntry>& TargetTable() {
  // Function-local static: filled by static initialisers in any translation-unit order.
  static std::vector<TargetEntry> table;
  return table;
}
}  // namespace jaxmps

JAXMPS_EXPORT int jaxmps_target_count() {
  return static_cast<int>(jaxmps::TargetTable().size());
}

JAXMPS_EXPORT const char* jaxmps_target_name(int i) { return jaxmps::TargetTable()[i].name; }

JAXMPS_EXPORT void* jaxmps_target_handler(int i) {
  return reinterpret_cast<void*>(jaxmps::TargetTable()[i].handler);
}

// Python compares this with the running jaxlib's XLA_FFI_API_{MAJOR,MINOR} before registering.
JAXMPS_EXPORT void jaxmps_ffi_api_version(int* major, int* minor) {
  *major = XLA_FFI_API_MAJOR;
  *minor = XLA_FFI_API_MINOR;
}

#ifndef JAXMPS_BACKEND_NAME
#define JAXMPS_BACKEND_NAME "unknown"
#endif

JAXMPS_EXPORT const char* jaxmps_build_info() {
  return JAXMPS_BACKEND_NAME " backend, built with " __VERSION__;
}
