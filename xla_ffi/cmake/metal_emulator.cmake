# libjaxmps_metal_emu (non-Apple hosts, default ON): the .metal kernels compiled as C++, run by
# the emulator under the Metal FFI handlers (jaxmps_<kernel>_metal_emu) and ctypes entry points.
if(APPLE)
  option(JAXMPS_ENABLE_METAL_EMULATOR "Build the Metal kernel emulator (tests only)" OFF)
else()
  option(JAXMPS_ENABLE_METAL_EMULATOR "Build the Metal kernel emulator (tests only)" ON)
endif()

if(JAXMPS_ENABLE_METAL_EMULATOR)
  set(JAXMPS_METAL_DIR ${CMAKE_CURRENT_SOURCE_DIR}/metal)
  file(GLOB JAXMPS_METAL_HANDLER_SOURCES CONFIGURE_DEPENDS ${JAXMPS_METAL_DIR}/host/*.cc)
  file(GLOB JAXMPS_METAL_KERNEL_SOURCES CONFIGURE_DEPENDS ${JAXMPS_METAL_DIR}/kernels/*.metal
       ${JAXMPS_METAL_DIR}/kernels/*.h ${JAXMPS_METAL_DIR}/emulator/*.metal)
  add_library(jaxmps_metal_emu SHARED
    ${JAXMPS_METAL_HANDLER_SOURCES}
    ${JAXMPS_METAL_DIR}/emulator/runtime.cc
    ${JAXMPS_METAL_DIR}/emulator/kernels.cc
    ${JAXMPS_METAL_DIR}/emulator/emu_runner.cc
    ${JAXMPS_METAL_DIR}/emulator/capi.cc)
  jaxmps_library(jaxmps_metal_emu "metal_emu")
  # <metal_stdlib> in the .metal sources resolves to the compatibility header.
  target_include_directories(jaxmps_metal_emu PRIVATE ${JAXMPS_METAL_DIR}/emulator/include)
  target_compile_definitions(jaxmps_metal_emu PRIVATE
    JAXMPS_METAL_TARGET_SUFFIX="_metal_emu")
  # kernels.cc #includes the .metal files, which CMake does not scan.
  set_source_files_properties(${JAXMPS_METAL_DIR}/emulator/kernels.cc PROPERTIES
    OBJECT_DEPENDS "${JAXMPS_METAL_KERNEL_SOURCES}")
  # -O2: every simulated thread runs the kernel code; no -ffast-math, NaN/Inf propagate.
  # Needs a compiler with _Float16 for Metal's half (GCC >= 12, Clang >= 15).
  target_compile_options(jaxmps_metal_emu PRIVATE -O2 -Wall -Wno-unknown-pragmas)
endif()
