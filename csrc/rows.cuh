// Row-wise building blocks shared by gather and unshuffle: copying rows picked by an index
// (zero rows where there is none) and deterministic sums of rows into a few "slots".
#pragma once

#include "common.cuh"

namespace m3ae {

constexpr int kCopyThreads = 256;
constexpr int kCopyILP = 4;  // vectors in flight per thread
constexpr int kReduceThreads = 128;
constexpr int kReduceChunkRows = 256;  // rows per block in the first reduction stage (fixed: deterministic)

// out[r, :] = src_row(r) ? src_row(r)[:] : 0 for r < rows, in `N`-element accesses.
// RowSrc: __device__ const T* operator()(long long r) const -> row pointer or nullptr.
template <typename T, int N, typename RowSrc>
__global__ void __launch_bounds__(kCopyThreads) copy_rows_kernel(T* __restrict__ out, long long rows, int D,
                                                                  RowSrc src) {
  const int nvec = D / N;
  const long long total = rows * nvec;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x * kCopyILP;
  for (long long base = static_cast<long long>(blockIdx.x) * blockDim.x * kCopyILP + threadIdx.x; base < total;
       base += step) {
    if constexpr (N == VecT<T>::N) {
      VecT<T> v[kCopyILP];
#pragma unroll
      for (int i = 0; i < kCopyILP; ++i) {
        const long long idx = base + static_cast<long long>(i) * blockDim.x;
        v[i] = zero_vec<T>();
        if (idx < total) {
          const long long r = idx / nvec;
          const T* p = src(r);
          if (p != nullptr) v[i] = load_vec(p + (idx - r * nvec) * N);
        }
      }
#pragma unroll
      for (int i = 0; i < kCopyILP; ++i) {
        const long long idx = base + static_cast<long long>(i) * blockDim.x;
        if (idx < total) {
          const long long r = idx / nvec;
          store_vec(out + r * D + (idx - r * nvec) * N, v[i]);
        }
      }
    } else {
      static_assert(N == 1, "scalar fallback moves one element per access");
      T v[kCopyILP];
#pragma unroll
      for (int i = 0; i < kCopyILP; ++i) {
        const long long idx = base + static_cast<long long>(i) * blockDim.x;
        v[i] = from_float<T>(0.f);
        if (idx < total) {
          const long long r = idx / D;
          const T* p = src(r);
          if (p != nullptr) v[i] = p[idx - r * D];
        }
      }
#pragma unroll
      for (int i = 0; i < kCopyILP; ++i) {
        const long long idx = base + static_cast<long long>(i) * blockDim.x;
        if (idx < total) out[idx] = v[i];
      }
    }
  }
}

// Rows of `src` (row stride `stride`) picked by `index[r]`; negative index = zero row.
template <typename T, typename Idx>
struct IndexedRows {
  const T* src;
  const Idx* index;
  long long stride;
  long long n_src;  // rows in src: out-of-range indices read as zero rows instead of faulting
  __device__ __forceinline__ const T* operator()(long long r) const {
    const long long s = static_cast<long long>(__ldg(index + r));
    return (s >= 0 && s < n_src) ? src + s * stride : nullptr;
  }
};

template <typename T, typename RowSrc>
void launch_copy_rows(const char* op, T* out, long long rows, int D, bool vec_ok, const RowSrc& src, int sms,
                      cudaStream_t stream) {
  if (rows <= 0 || D <= 0) return;
  constexpr int NV = VecT<T>::N;
  if (vec_ok && D % NV == 0) {
    const long long items = rows * (D / NV);
    const int grid = persistent_blocks(items, kCopyThreads * kCopyILP, sms, 8);
    copy_rows_kernel<T, NV, RowSrc><<<grid, kCopyThreads, 0, stream>>>(out, rows, D, src);
  } else {
    const long long items = rows * D;
    const int grid = persistent_blocks(items, kCopyThreads * kCopyILP, sms, 8);
    copy_rows_kernel<T, 1, RowSrc><<<grid, kCopyThreads, 0, stream>>>(out, rows, D, src);
  }
  M3AE_LAUNCH_CHECK(op);
}

// out[i] = index[i] in [0, rows) ? grad[index[i]] : 0 for i < n_out (grad [rows, D] contiguous):
// the backward of a row gather through its inverse map.
template <typename T>
void launch_rows_by_index(const char* op, T* out, long long n_out, const T* grad, long long rows, int D,
                          const int32_t* index, int sms, cudaStream_t stream) {
  const bool vec_ok = aligned16(reinterpret_cast<std::uintptr_t>(grad)) && aligned16(reinterpret_cast<std::uintptr_t>(out));
  launch_copy_rows<T>(op, out, n_out, D, vec_ok, IndexedRows<T, int32_t>{grad, index, D, rows}, sms, stream);
}

// Stage 1 of a deterministic "sum rows into NS slots": block (x = column tile, y = chunk of
// kReduceChunkRows rows) writes partial[y, s, c] = sum over its rows r with slot s of g[r, c].
// Slots: __device__ void operator()(long long r, int& s0, int& s1) const (-1 = none).
template <typename T, int NS, typename Slots>
__global__ void __launch_bounds__(kReduceThreads) slot_partial_kernel(const T* __restrict__ g, long long g_stride,
                                                                       long long rows, int D, Slots slots,
                                                                       float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const long long r0 = static_cast<long long>(blockIdx.y) * kReduceChunkRows;
  const long long r1 = r0 + kReduceChunkRows < rows ? r0 + kReduceChunkRows : rows;
  float acc[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) acc[s] = 0.f;
  if (c < D) {
    constexpr int U = 4;  // rows in flight
    for (long long r = r0; r < r1; r += U) {
      float x[U];
      int s0[U], s1[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s0[u] = s1[u] = -1;
        x[u] = 0.f;
        if (r + u < r1) {
          slots(r + u, s0[u], s1[u]);
          if (s0[u] >= 0 || s1[u] >= 0) x[u] = to_float(g[(r + u) * g_stride + c]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          if (s0[u] == s || s1[u] == s) acc[s] += x[u];
        }
      }
    }
#pragma unroll
    for (int s = 0; s < NS; ++s) partial[(static_cast<long long>(blockIdx.y) * NS + s) * D + c] = acc[s];
  }
}

// Stage 2: out[s, c] = sum over chunks of partial[chunk, s, c], in chunk order.
static __global__ void slot_finalize_kernel(const float* __restrict__ partial, int chunks, int NS, int D,
                                     float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= NS * D) return;
  float acc = 0.f;
  for (int k = 0; k < chunks; ++k) acc += partial[static_cast<long long>(k) * NS * D + i];
  out[i] = acc;
}

inline int reduce_chunks(long long rows) { return rows <= 0 ? 1 : ceil_div(rows, kReduceChunkRows); }

template <typename T, int NS, typename Slots>
void launch_slot_sum(const char* op, const T* g, long long g_stride, long long rows, int D, const Slots& slots,
                     float* workspace, long long workspace_elems, float* out, cudaStream_t stream) {
  const int chunks = reduce_chunks(rows);
  M3AE_CHECK(op, workspace_elems >= static_cast<long long>(chunks) * NS * D,
             "reduction workspace too small: need " + std::to_string(static_cast<long long>(chunks) * NS * D) +
                 " floats, got " + std::to_string(workspace_elems));
  M3AE_CHECK(op, chunks < 65536, "too many rows for the reduction grid");
  if (D <= 0) return;
  dim3 grid(ceil_div(D, kReduceThreads), chunks);
  slot_partial_kernel<T, NS, Slots><<<grid, kReduceThreads, 0, stream>>>(g, g_stride, rows, D, slots, workspace);
  M3AE_LAUNCH_CHECK(op);
  slot_finalize_kernel<<<ceil_div(static_cast<long long>(NS) * D, 256), 256, 0, stream>>>(workspace, chunks, NS, D,
                                                                                            out);
  M3AE_LAUNCH_CHECK(op);
}

}  // namespace m3ae
