# Builds libjaxmps_cuda (the CUDA kernels); included by CMakeLists.txt unless
# JAXMPS_ENABLE_CUDA=OFF. AUTO skips it without nvcc; ON without nvcc is a configure error.

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(JAXMPS_ENABLE_CUDA STREQUAL "AUTO")
    message(STATUS "jaxmps: nvcc not found, building without the CUDA library "
                   "(-DJAXMPS_ENABLE_CUDA=ON makes this an error)")
    return()
  endif()
  message(FATAL_ERROR
    "JAXMPS_ENABLE_CUDA=ON but no CUDA compiler (nvcc) was found. Put nvcc on PATH, or point "
    "CMAKE_CUDA_COMPILER (or the CUDACXX environment variable) at it, or build with "
    "-DJAXMPS_ENABLE_CUDA=OFF.")
endif()
message(STATUS "jaxmps: building the CUDA library with ${CMAKE_CUDA_COMPILER}")

# sm_80 (A100) and sm_90 (H100/H200) machine code plus their PTX, which newer GPUs JIT.
# Set before enable_language so CMake does not probe a default the toolkit may have dropped.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "80;90")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# C++17: the newest dialect CMake 3.18+ can ask nvcc for everywhere (ffi.h needs 17).
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_EXTENSIONS OFF)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_VISIBILITY_PRESET hidden)

file(GLOB JAXMPS_CUDA_SOURCES CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cu ${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cc)
add_library(jaxmps_cuda SHARED ${JAXMPS_CUDA_SOURCES})
jaxmps_library(jaxmps_cuda "cuda")
target_include_directories(jaxmps_cuda PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cuda)
# The CUDA runtime is linked statically: the library needs no libcudart of any version at run
# time (JAX's own may differ), only the driver's libcuda, which cudart_static opens itself.
set_target_properties(jaxmps_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
target_link_libraries(jaxmps_cuda PRIVATE CUDA::cudart_static)
# No fast-math: NaN/Inf propagate as in the reference. -Xptxas -v would print register use.
target_compile_options(jaxmps_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>
  $<$<COMPILE_LANGUAGE:CXX>:-O3 -Wall>)
