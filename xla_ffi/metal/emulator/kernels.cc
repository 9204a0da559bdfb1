// The jaxmps Metal kernel sources, unchanged, compiled as C++ for the emulator (<metal_stdlib>
// resolves to metal_compat.h), plus its self-tests; each kernel registers under its Metal name.
#include "../kernels/statistics.metal"
#include "../kernels/window_norm.metal"
#include "../kernels/convolution.metal"
#include "selftest.metal"
