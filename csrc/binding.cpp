// pybind11 entry point of m3ae_engine._C. Kernels live one op per .cu file; this file only binds them.
// No libtorch: arguments are device pointers (ints), shapes, dtype codes, the device index and the
// caller's CUDA stream handle, so one build serves every torch release. Errors raised by the
// kernels' host code (m3ae::OpError, naming the op) arrive in Python as RuntimeError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "ops.h"

namespace py = pybind11;
using namespace pybind11::literals;

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

static std::string device_status() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  return std::to_string(n) + " device(s)";
}

static int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

static int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

// Synchronise the device (tests/sanitizer): surfaces asynchronous kernel faults as exceptions.
static void synchronize(int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("m3ae_engine._C.synchronize: ") + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "m3ae-engine CUDA kernels (pointers + shapes + stream; no libtorch link)";
  m.def("compiled_archs", &compiled_archs, "CUDA architectures this module was built for");
  m.def("device_count", &device_count, "CUDA devices visible to the module's runtime (0 without a GPU)");
  m.def("device_status", &device_status, "why device_count() is what it is (the runtime's error without a GPU)");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the module was linked with (static)");
  m.def("driver_version", &driver_version, "CUDA version the installed driver supports (0 without a driver)");
  m.def("synchronize", &synchronize, "device"_a);
  m.attr("DTYPE_FLOAT32") = static_cast<int>(m3ae::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(m3ae::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(m3ae::kFloat16);
  m.attr("DTYPE_UINT8") = static_cast<int>(m3ae::kUInt8);
  m.attr("REDUCE_CHUNK_ROWS") = m3ae::reduce_chunk_rows();

  // Kernel calls release the GIL: they only enqueue work on the caller's stream.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gather_forward", &m3ae::gather_forward, "out"_a, "image"_a, "image_stride"_a, "n_image"_a, "text"_a,
        "text_stride"_a, "n_text"_a, "cls"_a, "row_source"_a, "rows"_a, "D"_a, "dtype"_a, "device"_a, "stream"_a,
        nogil);
  m.def("gather_backward", &m3ae::gather_backward, "grad"_a, "rows"_a, "D"_a, "row_source"_a, "grad_image"_a,
        "image_row_of"_a, "n_image"_a, "grad_text"_a, "text_row_of"_a, "n_text"_a, "grad_cls"_a, "workspace"_a,
        "workspace_elems"_a, "dtype"_a, "device"_a, "stream"_a, nogil);
  m.def("unshuffle_forward", &m3ae::unshuffle_forward, "out"_a, "visible"_a, "visible_stride"_a, "n_visible"_a,
        "mask_tokens"_a, "type_embeddings"_a, "pos_table"_a, "n_pos"_a, "row_visible"_a, "row_kind"_a,
        "row_pos"_a, "rows"_a, "D"_a, "dtype"_a, "device"_a, "stream"_a, nogil);
  m.def("unshuffle_backward", &m3ae::unshuffle_backward, "grad"_a, "rows"_a, "D"_a, "row_visible"_a, "row_kind"_a,
        "grad_visible"_a, "row_of_visible"_a, "n_visible"_a, "grad_mask"_a, "grad_type"_a, "workspace"_a,
        "workspace_elems"_a, "dtype"_a, "device"_a, "stream"_a, nogil);
  m.def("masked_mse_forward", &m3ae::masked_mse_forward, "pred"_a, "pred_stride"_a, "pred_dtype"_a, "imgs"_a,
        "img_dtype"_a, "B"_a, "C"_a, "H"_a, "W"_a, "patch"_a, "patch_index"_a, "row_weight"_a, "rows"_a,
        "norm_pix"_a, "mean"_a, "std"_a, "row_loss"_a, "loss"_a, "device"_a, "stream"_a, nogil);
  m.def("masked_mse_backward", &m3ae::masked_mse_backward, "grad_pred"_a, "pred"_a, "pred_stride"_a,
        "pred_dtype"_a, "imgs"_a, "img_dtype"_a, "B"_a, "C"_a, "H"_a, "W"_a, "patch"_a, "patch_index"_a,
        "row_weight"_a, "rows"_a, "norm_pix"_a, "mean"_a, "std"_a, "grad_loss"_a, "device"_a, "stream"_a, nogil);
  m.def("lce_softmax", &m3ae::lce_softmax, "logits"_a, "ld"_a, "dtype"_a, "bias"_a, "targets"_a, "row_weight"_a,
        "n"_a, "V"_a, "row_loss"_a, "row_correct"_a, "write_grad"_a, "device"_a, "stream"_a, nogil);
}
