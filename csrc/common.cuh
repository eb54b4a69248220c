// Shared helpers of the m3ae-engine CUDA kernels: error checks that become Python exceptions,
// dtype dispatch, 16-byte vector loads/stores, warp/block reductions, launch geometry.
//
// The module links no libtorch: every entry point takes raw device pointers (Python ints),
// shapes, dtype codes and the CUDA stream handle of the caller (torch's current stream).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "ops.h"  // DType codes
#include <string>

namespace m3ae {

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    case kUInt8: return "uint8";
    default: return "unknown";
  }
}

// An error inside op `op`: raised in C++, translated by pybind11 into a Python RuntimeError.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check_cuda(cudaError_t err, const char* op, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear non-sticky errors so the next op starts clean
    throw OpError(std::string("m3ae_engine._C.") + op + ": " + what + " failed: " + cudaGetErrorName(err) +
                  " (" + cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
  }
}

// Check a CUDA runtime call.
#define M3AE_CUDA_CHECK(op, call) ::m3ae::check_cuda((call), (op), #call, __FILE__, __LINE__)
// Check the launch that was just issued (configuration errors surface here, not later).
#define M3AE_LAUNCH_CHECK(op) ::m3ae::check_cuda(cudaGetLastError(), (op), "kernel launch", __FILE__, __LINE__)
// Argument validation.
#define M3AE_CHECK(op, cond, msg)                                                                      \
  do {                                                                                                 \
    if (!(cond)) throw ::m3ae::OpError(std::string("m3ae_engine._C.") + (op) + ": " + (msg));         \
  } while (0)

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Makes `device` current for the scope of one entry point (torch may have another one current)
// and restores the previous device on exit; `sms` = the device's multiprocessor count.
struct DeviceScope {
  int prev = -1, sms = 0;
  DeviceScope(const char* op, int device) {
    M3AE_CUDA_CHECK(op, cudaGetDevice(&prev));
    if (prev != device) M3AE_CUDA_CHECK(op, cudaSetDevice(device));
    static int cached[64] = {0};
    if (device >= 0 && device < 64 && cached[device] > 0) {
      sms = cached[device];
    } else {
      M3AE_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      if (device >= 0 && device < 64) cached[device] = sms;
    }
  }
  ~DeviceScope() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev && prev >= 0) cudaSetDevice(prev);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

inline bool aligned16(std::uintptr_t p) { return (p & 15u) == 0; }

// ---------------------------------------------------------------------------------------------
// element conversions (fp32 accumulation everywhere)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(uint8_t x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------------------------------------
// 16-byte vectors: VecT<T>::N elements of T moved by one 128-bit load/store
// ---------------------------------------------------------------------------------------------
template <typename T>
struct VecT {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

template <typename T>
__device__ __forceinline__ VecT<T> load_vec(const T* p) {  // p 16-byte aligned
  VecT<T> r;
  r.raw = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}
template <typename T>
__device__ __forceinline__ VecT<T> load_vec_rw(const T* p) {  // memory the same kernel also writes: no .nc
  VecT<T> r;
  r.raw = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <typename T>
__device__ __forceinline__ VecT<T> load_vec_stream(const T* p) {  // read once: do not keep in L1
  VecT<T> r;
  r.raw = __ldcs(reinterpret_cast<const uint4*>(p));
  return r;
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const VecT<T>& x) {
  *reinterpret_cast<uint4*>(p) = x.raw;
}
template <typename T>
__device__ __forceinline__ VecT<T> zero_vec() {
  VecT<T> r;
  r.raw = make_uint4(0u, 0u, 0u, 0u);
  return r;
}

// ---------------------------------------------------------------------------------------------
// reductions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// Fixed reduction tree: deterministic.
__device__ __forceinline__ float block_sum(float x, float* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // smem32 may still be read by a previous call
  if (lane == 0) smem32[warp] = x;
  __syncthreads();
  x = lane < nwarps ? smem32[lane] : 0.f;
  return warp_sum(x);
}

// ---------------------------------------------------------------------------------------------
// launch geometry
// ---------------------------------------------------------------------------------------------
inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Persistent grid: enough blocks to fill the device (`per_sm` blocks per SM), never more than the work.
inline int persistent_blocks(long long work_items, int items_per_block, int sms, int per_sm = 4) {
  long long need = (work_items + items_per_block - 1) / items_per_block;
  long long cap = static_cast<long long>(sms) * per_sm;
  if (need < 1) need = 1;
  return static_cast<int>(need < cap ? need : cap);
}

// Dispatch a floating dtype code to a C++ type `scalar_t` inside the lambda-like body.
#define M3AE_DISPATCH_FLOAT(op, code, ...)                                              \
  switch (code) {                                                                       \
    case ::m3ae::kFloat32: { using scalar_t = float; __VA_ARGS__; } break;              \
    case ::m3ae::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; } break;     \
    case ::m3ae::kFloat16: { using scalar_t = __half; __VA_ARGS__; } break;             \
    default:                                                                            \
      throw ::m3ae::OpError(std::string("m3ae_engine._C.") + (op) + ": unsupported dtype " + \
                            ::m3ae::dtype_name(code));                                  \
  }

}  // namespace m3ae
