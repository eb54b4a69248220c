// The softmax / cross-entropy part of masked_linear_cross_entropy. The vocabulary matmuls stay in
// torch (cuBLAS); per chunk of rows, this kernel takes the logits [n, V] (without bias), and per row
//   pass 1: online max / sum-exp (log-sum-exp), argmax (first maximum, as torch.argmax), target logit;
//   pass 2 (with write_grad): overwrites the row in place with w * (softmax - onehot(target)),
// so a chunk needs O(chunk x V) memory and the logits are never kept. Bias is added in fp32 here.
// One block per row on a persistent grid; 16-byte loads for the aligned body of each row, scalar
// head/tail (V = 30522 rows are not 16-byte aligned); several vectors in flight per thread.
#include <cfloat>

#include "common.cuh"
#include "ops.h"

namespace m3ae {

namespace {

constexpr int kThreads = 512;
constexpr int kILP = 2;

struct MaxSum {  // running (max, sum exp(x - max), argmax)
  float m, s;
  long long idx;
};

__device__ __forceinline__ void push(MaxSum& a, float x, long long i) {
  if (x > a.m) {
    a.s = a.s * __expf(a.m - x) + 1.f;
    a.m = x;
    a.idx = i;
  } else {
    a.s += __expf(x - a.m);
  }
}

__device__ __forceinline__ MaxSum combine(const MaxSum& a, const MaxSum& b) {
  MaxSum r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) {
    r.s = 0.f;
  } else {
    r.s = (a.s == 0.f ? 0.f : a.s * __expf(a.m - r.m)) + (b.s == 0.f ? 0.f : b.s * __expf(b.m - r.m));
  }
  if (a.m > b.m) r.idx = a.idx;
  else if (b.m > a.m) r.idx = b.idx;
  else r.idx = a.idx < b.idx ? a.idx : b.idx;
  return r;
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
    b.idx = __shfl_xor_sync(0xffffffffu, a.idx, o);
    a = combine(a, b);
  }
  return a;
}

// Visits every column v of the row with x = logit + bias (fp32), each thread in increasing order:
// scalar head up to 16-byte alignment, vector body (kILP vectors in flight), scalar tail.
// WRITE = false: calls f(v, x). WRITE = true: overwrites the column with f(v, x) (vector stores in the body).
template <typename T, bool VEC, bool WRITE, typename F>
__device__ __forceinline__ void sweep_row(T* row, const float* __restrict__ bias, long long V, F&& f) {
  constexpr int N = VecT<T>::N;
  long long head = V, nvec = 0;
  if (VEC) {
    head = ((16 - (reinterpret_cast<std::uintptr_t>(row) & 15)) & 15) / sizeof(T);
    if (head > V) head = V;
    nvec = (V - head) / N;
  }
  auto visit = [&](long long v, T raw) -> T {
    const float x = to_float(raw) + (bias ? __ldg(bias + v) : 0.f);
    if constexpr (WRITE) {
      return from_float<T>(f(v, x));
    } else {
      f(v, x);
      return raw;
    }
  };
  for (long long v = threadIdx.x; v < head; v += blockDim.x) {
    const T y = visit(v, row[v]);
    if constexpr (WRITE) row[v] = y;
  }
  if (VEC) {
    T* body = row + head;
    for (long long k0 = threadIdx.x; k0 < nvec; k0 += static_cast<long long>(blockDim.x) * kILP) {
      VecT<T> x[kILP];
#pragma unroll
      for (int u = 0; u < kILP; ++u) {
        const long long k = k0 + static_cast<long long>(u) * blockDim.x;
        if (k < nvec) x[u] = load_vec_rw(body + k * N);
      }
#pragma unroll
      for (int u = 0; u < kILP; ++u) {
        const long long k = k0 + static_cast<long long>(u) * blockDim.x;
        if (k < nvec) {
          VecT<T> y;
#pragma unroll
          for (int i = 0; i < N; ++i) y.v[i] = visit(head + k * N + i, x[u].v[i]);
          if constexpr (WRITE) store_vec(body + k * N, y);
        }
      }
    }
    for (long long v = head + nvec * N + threadIdx.x; v < V; v += blockDim.x) {
      const T y = visit(v, row[v]);
      if constexpr (WRITE) row[v] = y;
    }
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) lce_softmax_kernel(T* __restrict__ logits, long long ld,
                                                              const float* __restrict__ bias,
                                                              const int64_t* __restrict__ targets,
                                                              const float* __restrict__ row_weight, long long n,
                                                              long long V, float* __restrict__ row_loss,
                                                              float* __restrict__ row_correct, bool write_grad) {
  __shared__ MaxSum red[32];
  __shared__ float s_lse;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (long long r = blockIdx.x; r < n; r += gridDim.x) {
    T* row = logits + r * ld;
    long long t = __ldg(targets + r);
    const bool t_ok = t >= 0 && t < V;
    const float w = __ldg(row_weight + r);
    MaxSum a{-INFINITY, 0.f, 0};
    sweep_row<T, VEC, false>(row, bias, V, [&](long long v, float x) { push(a, x, v); });
    a = warp_combine(a);
    __syncthreads();  // red / s_lse of the previous row are no longer read
    if (lane == 0) red[warp] = a;
    __syncthreads();
    if (warp == 0) {
      a = lane < nwarps ? red[lane] : MaxSum{-INFINITY, 0.f, 0};
      a = warp_combine(a);
      if (lane == 0) {
        const float lse = a.m + __logf(a.s);
        s_lse = lse;
        const float xt = t_ok ? to_float(row[t]) + (bias ? __ldg(bias + t) : 0.f) : NAN;
        row_loss[r] = w == 0.f ? 0.f : w * (lse - xt);
        row_correct[r] = (w != 0.f && a.idx == t) ? w : 0.f;
      }
    }
    __syncthreads();
    if (write_grad) {
      // every element of the row is written (zeros for zero-weight rows), 16-byte stores in the body
      const float lse = s_lse;
      auto grad_of = [&](long long v, float x) {
        return w == 0.f ? 0.f : w * __expf(x - lse) - (v == t ? w : 0.f);
      };
      sweep_row<T, VEC, true>(row, bias, V, grad_of);
    }
  }
}

}  // namespace

void lce_softmax(ptr_t logits, long long ld, int dtype, ptr_t bias, ptr_t targets, ptr_t row_weight, long long n,
                 long long V, ptr_t row_loss, ptr_t row_correct, bool write_grad, int device, ptr_t stream) {
  const char* op = "masked_linear_cross_entropy";
  M3AE_CHECK(op, logits != 0 && targets != 0 && row_weight != 0 && row_loss != 0 && row_correct != 0,
             "missing pointer");
  M3AE_CHECK(op, V > 0 && ld >= V && n >= 0, "bad shape");
  if (n == 0) return;
  DeviceScope scope(op, device);
  const int sms = scope.sms;
  const int grid = persistent_blocks(n, 1, sms, 4);
  cudaStream_t st = as_stream(stream);
  M3AE_DISPATCH_FLOAT(op, dtype, {
    auto launch = [&](auto vec_tag) {
      constexpr bool VEC = decltype(vec_tag)::value;
      lce_softmax_kernel<scalar_t, VEC><<<grid, kThreads, 0, st>>>(
          as_ptr<scalar_t>(logits), ld, as_ptr<const float>(bias), as_ptr<const int64_t>(targets),
          as_ptr<const float>(row_weight), n, V, as_ptr<float>(row_loss), as_ptr<float>(row_correct), write_grad);
      M3AE_LAUNCH_CHECK(op);
    };
    if (V >= 4 * VecT<scalar_t>::N) launch(std::true_type{});
    else launch(std::false_type{});
  });
}

}  // namespace m3ae
