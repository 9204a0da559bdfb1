# The CUDA emulator library jaxmps_cuda_emu (tests only): the CUDA kernel sources compiled as
# C++ against cuda/emulator/cuda_emu.h (threads, barriers and warp shuffles on the host), so
# that GPU-less CI runs the CUDA kernel logic (tests/test_cuda_emulator.py registers its
# handlers for XLA:CPU). Needs the CUDA headers only, not nvcc or a GPU.
option(JAXMPS_ENABLE_CUDA_EMULATOR "Build the CUDA kernel emulator (tests only)" ON)
if(NOT JAXMPS_ENABLE_CUDA_EMULATOR)
  return()
endif()
find_path(JAXMPS_CUDA_HEADERS cuda_fp16.h
          HINTS ENV CUDA_HOME ENV CUDA_PATH
          PATHS /usr/local/cuda
          PATH_SUFFIXES include targets/x86_64-linux/include)
if(NOT JAXMPS_CUDA_HEADERS)
  message(STATUS "jaxmps: CUDA headers not found, building without the CUDA emulator")
  return()
endif()

# The .cu files are compiled as C++ here (and as CUDA in jaxmps_cuda): copy them to .cc.
file(GLOB JAXMPS_CUDA_EMU_INPUTS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cu)
set(JAXMPS_CUDA_EMU_SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/cuda/emulator/cuda_emu.cc)
foreach(input ${JAXMPS_CUDA_EMU_INPUTS})
  get_filename_component(name ${input} NAME_WE)
  configure_file(${input} ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu/${name}.cc COPYONLY)
  list(APPEND JAXMPS_CUDA_EMU_SOURCES ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu/${name}.cc)
endforeach()

add_library(jaxmps_cuda_emu SHARED ${JAXMPS_CUDA_EMU_SOURCES})
jaxmps_library(jaxmps_cuda_emu "cuda_emu")
target_include_directories(jaxmps_cuda_emu PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cuda)
target_include_directories(jaxmps_cuda_emu SYSTEM PRIVATE ${JAXMPS_CUDA_HEADERS})
target_compile_definitions(jaxmps_cuda_emu PRIVATE JAXMPS_CUDA_EMU)
# -O1: quick to build; every emulated thread runs the kernel code. No -ffast-math, and no fused
# multiply-adds on any host (-ffp-contract=off): the emulator's arithmetic is the source's, the
# same on every machine (test_compiled_beta_kernels compares two kernels' bits).
target_compile_options(jaxmps_cuda_emu PRIVATE -O1 -ffp-contract=off -Wall -Wno-unknown-pragmas)
find_package(Threads REQUIRED)
target_link_libraries(jaxmps_cuda_emu PRIVATE Threads::Threads)
