# The Metal backend (macOS): jaxmps_kernels.metallib (xcrun metal/metallib) and libjaxmps_metal
# (FFI handlers + Objective-C++ runner, Metal/Foundation), both installed into jaxmps/_lib.
enable_language(OBJCXX)

set(JAXMPS_METAL_DIR ${CMAKE_CURRENT_SOURCE_DIR}/metal)
# MSL 3.1 (macOS 14) has bfloat; with metal3.0 the bfloat16 kernels are left out.
set(JAXMPS_METAL_STD "metal3.1" CACHE STRING "Metal Shading Language version (-std=...)")
set(JAXMPS_METAL_MACOS_MIN "14.0" CACHE STRING "Minimum macOS of the metallib")

execute_process(COMMAND xcrun -sdk macosx metal --version RESULT_VARIABLE metal_missing
                OUTPUT_QUIET ERROR_QUIET)
if(metal_missing)
  message(FATAL_ERROR "jaxmps: the Metal compiler (xcrun -sdk macosx metal) is missing; install "
                      "Xcode, and with Xcode 26+ run: xcodebuild -downloadComponent "
                      "MetalToolchain (or configure with -DJAXMPS_ENABLE_METAL=OFF)")
endif()

file(GLOB JAXMPS_METAL_KERNELS CONFIGURE_DEPENDS ${JAXMPS_METAL_DIR}/kernels/*.metal)
file(GLOB JAXMPS_METAL_KERNEL_HEADERS CONFIGURE_DEPENDS ${JAXMPS_METAL_DIR}/kernels/*.h)
set(JAXMPS_METALLIB ${CMAKE_CURRENT_BINARY_DIR}/jaxmps_kernels.metallib)
set(JAXMPS_METAL_AIR)
foreach(source ${JAXMPS_METAL_KERNELS})
  get_filename_component(name ${source} NAME_WE)
  set(air ${CMAKE_CURRENT_BINARY_DIR}/metal_air/${name}.air)
  # -fno-fast-math: NaN/Inf propagate and pow/rsqrt keep full precision, as in the reference.
  add_custom_command(
    OUTPUT ${air}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_CURRENT_BINARY_DIR}/metal_air
    COMMAND xcrun -sdk macosx metal -std=${JAXMPS_METAL_STD}
            -mmacosx-version-min=${JAXMPS_METAL_MACOS_MIN} -fno-fast-math -Wall -Wextra
            -c ${source} -o ${air}
    DEPENDS ${source} ${JAXMPS_METAL_KERNEL_HEADERS}
    COMMENT "Compiling Metal kernels ${name}.metal"
    VERBATIM)
  list(APPEND JAXMPS_METAL_AIR ${air})
endforeach()
add_custom_command(
  OUTPUT ${JAXMPS_METALLIB}
  COMMAND xcrun -sdk macosx metallib ${JAXMPS_METAL_AIR} -o ${JAXMPS_METALLIB}
  DEPENDS ${JAXMPS_METAL_AIR}
  COMMENT "Linking jaxmps_kernels.metallib"
  VERBATIM)
add_custom_target(jaxmps_metallib ALL DEPENDS ${JAXMPS_METALLIB})

file(GLOB JAXMPS_METAL_HANDLER_SOURCES CONFIGURE_DEPENDS ${JAXMPS_METAL_DIR}/host/*.cc)
add_library(jaxmps_metal SHARED ${JAXMPS_METAL_HANDLER_SOURCES}
            ${JAXMPS_METAL_DIR}/host/metal_runner.mm)
jaxmps_library(jaxmps_metal "metal")
add_dependencies(jaxmps_metal jaxmps_metallib)
target_compile_options(jaxmps_metal PRIVATE -O2 -Wall $<$<COMPILE_LANGUAGE:OBJCXX>:-fobjc-arc>)
target_link_libraries(jaxmps_metal PRIVATE "-framework Metal" "-framework Foundation")
install(FILES ${JAXMPS_METALLIB} DESTINATION ${JAXMPS_INSTALL_DIR})
