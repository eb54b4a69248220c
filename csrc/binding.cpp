// pybind11 entry point of m3ae_engine._C. Kernels live one per .cu file; this file only binds them.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

static std::string compiled_archs() { return M3AE_CUDA_ARCHS; }

static int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "m3ae-engine CUDA kernels (pointers + shapes + stream; no libtorch link)";
  m.def("compiled_archs", &compiled_archs, "CUDA architectures this module was built for");
  m.def("device_count", &device_count, "CUDA devices visible to the module's runtime (0 without a GPU)");
}
