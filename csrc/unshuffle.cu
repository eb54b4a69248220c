// unshuffle: decoder input rows = visible row or the modality's mask token, + position + type.
// Forward: persistent, 16-byte-vectorised row kernel (fp32 math, one store per element).
// Backward: grad_visible is a row copy through row_of_visible (zeros for filler rows);
// grad of the [2, D] mask tokens and type embeddings is a deterministic two-stage sum by kind.
#include "common.cuh"
#include "ops.h"
#include "rows.cuh"

namespace m3ae {

namespace {

constexpr int kThreads = 256;

// Load N consecutive fp32 values (16-byte loads when N is a multiple of 4: rows of contiguous
// fp32 [., D] tables are 16-byte aligned whenever D % 4 == 0, which the vector path guarantees).
template <int N>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float (&x)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      x[i] = v.x; x[i + 1] = v.y; x[i + 2] = v.z; x[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = __ldg(p + i);
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) unshuffle_forward_kernel(
    T* __restrict__ out, const T* __restrict__ visible, long long visible_stride, long long n_visible,
    const float* __restrict__ mask_tokens, const float* __restrict__ types, const float* __restrict__ pos,
    long long n_pos, const int32_t* __restrict__ row_visible, const int32_t* __restrict__ row_kind,
    const int32_t* __restrict__ row_pos, long long rows, int D) {
  const int nvec = D / N;
  const long long total = rows * nvec;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = idx / nvec;
    const int c = static_cast<int>(idx - r * nvec) * N;
    const int kind = __ldg(row_kind + r);
    long long vis = __ldg(row_visible + r);
    if (vis >= n_visible) vis = -1;
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
    const bool is_tok = kind == 0 || kind == 1;
    if (kind >= 0 && vis >= 0) {  // a visible row (token or CLS)
      const T* src = visible + vis * visible_stride + c;
      if constexpr (N == VecT<T>::N) {
        const VecT<T> v = load_vec(src);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = to_float(v.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = to_float(src[i]);
      }
    } else if (is_tok) {  // masked position: the modality's mask token
      load_f32<N>(mask_tokens + kind * D + c, acc);
    }
    if (is_tok) {
      float x[N];
      if (types != nullptr) {
        load_f32<N>(types + kind * D + c, x);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += x[i];
      }
      if (pos != nullptr) {
        long long pr = __ldg(row_pos + r);
        pr = pr < 0 ? 0 : (pr >= n_pos ? n_pos - 1 : pr);
        load_f32<N>(pos + pr * D + c, x);
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += x[i];
      }
    }
    T* dst = out + r * D + c;
    if constexpr (N == VecT<T>::N) {
      VecT<T> v;
#pragma unroll
      for (int i = 0; i < N; ++i) v.v[i] = from_float<T>(acc[i]);
      store_vec(dst, v);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) dst[i] = from_float<T>(acc[i]);
    }
  }
}

// Slots: 0/1 = mask token image/text (masked token rows), 2/3 = type image/text (every token row).
struct UnshuffleSlots {
  const int32_t* row_visible;
  const int32_t* row_kind;
  bool with_types;
  __device__ __forceinline__ void operator()(long long r, int& s0, int& s1) const {
    const int kind = __ldg(row_kind + r);
    s0 = s1 = -1;
    if (kind == 0 || kind == 1) {
      if (__ldg(row_visible + r) < 0) s0 = kind;
      if (with_types) s1 = 2 + kind;
    }
  }
};

}  // namespace

void unshuffle_forward(ptr_t out, ptr_t visible, long long visible_stride, long long n_visible, ptr_t mask_tokens,
                       ptr_t type_embeddings, ptr_t pos_table, long long n_pos, ptr_t row_visible, ptr_t row_kind,
                       ptr_t row_pos, long long rows, int D, int dtype, int device, ptr_t stream) {
  const char* op = "unshuffle_forward";
  M3AE_CHECK(op, out != 0 && mask_tokens != 0 && row_visible != 0 && row_kind != 0 && row_pos != 0,
             "out, mask_tokens and the row maps are required");
  M3AE_CHECK(op, pos_table == 0 || n_pos > 0, "empty position table");
  M3AE_CHECK(op, D > 0 && rows >= 0, "bad shape");
  if (rows == 0) return;
  DeviceScope scope(op, device);
  const int sms = scope.sms;
  M3AE_DISPATCH_FLOAT(op, dtype, {
    constexpr int NV = VecT<scalar_t>::N;
    const bool vec_ok = D % NV == 0 && aligned16(out) && aligned16(visible) && visible_stride % NV == 0 &&
                        aligned16(mask_tokens) && aligned16(type_embeddings) && aligned16(pos_table);
    auto launch = [&](auto n_tag) {
      constexpr int N = decltype(n_tag)::value;
      const long long items = rows * (D / N);
      const int grid = persistent_blocks(items, kThreads, sms, 8);
      unshuffle_forward_kernel<scalar_t, N><<<grid, kThreads, 0, as_stream(stream)>>>(
          as_ptr<scalar_t>(out), as_ptr<const scalar_t>(visible), visible_stride, visible ? n_visible : 0,
          as_ptr<const float>(mask_tokens), as_ptr<const float>(type_embeddings), as_ptr<const float>(pos_table),
          n_pos, as_ptr<const int32_t>(row_visible), as_ptr<const int32_t>(row_kind),
          as_ptr<const int32_t>(row_pos), rows, D);
      M3AE_LAUNCH_CHECK(op);
    };
    if (vec_ok) launch(std::integral_constant<int, NV>{});
    else launch(std::integral_constant<int, 1>{});
  });
}

void unshuffle_backward(ptr_t grad, long long rows, int D, ptr_t row_visible, ptr_t row_kind, ptr_t grad_visible,
                        ptr_t row_of_visible, long long n_visible, ptr_t grad_mask, ptr_t grad_type,
                        ptr_t workspace, long long workspace_elems, int dtype, int device, ptr_t stream) {
  const char* op = "unshuffle_backward";
  M3AE_CHECK(op, grad != 0 && row_visible != 0 && row_kind != 0, "grad and the row maps are required");
  M3AE_CHECK(op, grad_visible == 0 || row_of_visible != 0, "grad_visible needs row_of_visible");
  M3AE_CHECK(op, (grad_mask == 0 && grad_type == 0) || workspace != 0, "parameter grads need a workspace");
  DeviceScope scope(op, device);
  const int sms = scope.sms;
  cudaStream_t st = as_stream(stream);
  M3AE_DISPATCH_FLOAT(op, dtype, {
    const scalar_t* g = as_ptr<const scalar_t>(grad);
    if (grad_visible)
      launch_rows_by_index(op, as_ptr<scalar_t>(grad_visible), n_visible, g, rows, D,
                           as_ptr<const int32_t>(row_of_visible), sms, st);
    if (grad_mask || grad_type) {
      // one pass over grad for all four [D] sums; the fp32 result is [4, D]: mask img/txt, type img/txt
      M3AE_CHECK(op, grad_mask != 0, "grad_mask is required when grad_type is given");
      UnshuffleSlots slots{as_ptr<const int32_t>(row_visible), as_ptr<const int32_t>(row_kind), grad_type != 0};
      if (grad_type) {
        M3AE_CHECK(op, grad_type == grad_mask + sizeof(float) * 2 * static_cast<ptr_t>(D),
                   "grad_type must follow grad_mask in one fp32 [4, D] buffer");
        launch_slot_sum<scalar_t, 4>(op, g, D, rows, D, slots, as_ptr<float>(workspace), workspace_elems,
                                     as_ptr<float>(grad_mask), st);
      } else {
        launch_slot_sum<scalar_t, 2>(op, g, D, rows, D, slots, as_ptr<float>(workspace), workspace_elems,
                                     as_ptr<float>(grad_mask), st);
      }
    }
  });
}

}  // namespace m3ae
