// gather: packed encoder rows from (CLS, image tokens, text tokens) by a per-row source code.
// Forward: one persistent, 16-byte-vectorised row copy. Backward: the inverse maps turn the
// scatter into two more row copies (every grad element written, zeros where unused) plus a
// deterministic two-stage column sum for the CLS gradient.
#include "common.cuh"
#include "ops.h"
#include "rows.cuh"

namespace m3ae {

namespace {

template <typename T>
struct GatherSource {
  const T* image;
  const T* text;
  const T* cls;
  const int32_t* code;
  long long image_stride, text_stride, n_image, n_text;
  __device__ __forceinline__ const T* operator()(long long r) const {
    const long long s = static_cast<long long>(__ldg(code + r));
    if (s == -1) return cls;  // nullptr when there is no CLS: zero row
    if (s < 0) return nullptr;  // filler
    if (s < n_image) return image + s * image_stride;
    const long long t = s - n_image;
    return (t < n_text && text != nullptr) ? text + t * text_stride : nullptr;
  }
};

struct ClsSlot {
  const int32_t* code;
  __device__ __forceinline__ void operator()(long long r, int& s0, int& s1) const {
    s0 = __ldg(code + r) == -1 ? 0 : -1;
    s1 = -1;
  }
};

}  // namespace

int reduce_chunk_rows() { return kReduceChunkRows; }

void gather_forward(ptr_t out, ptr_t image, long long image_stride, long long n_image, ptr_t text,
                    long long text_stride, long long n_text, ptr_t cls, ptr_t row_source, long long rows, int D,
                    int dtype, int device, ptr_t stream) {
  const char* op = "gather_forward";
  M3AE_CHECK(op, out != 0 && row_source != 0, "out and row_source are required");
  M3AE_CHECK(op, D > 0 && rows >= 0, "bad shape");
  DeviceScope scope(op, device);
  const int sms = scope.sms;
  M3AE_DISPATCH_FLOAT(op, dtype, {
    constexpr int NV = VecT<scalar_t>::N;
    const bool vec_ok = aligned16(out) && aligned16(image) && aligned16(text) && aligned16(cls) &&
                        image_stride % NV == 0 && text_stride % NV == 0;
    GatherSource<scalar_t> src{as_ptr<const scalar_t>(image), as_ptr<const scalar_t>(text),
                               as_ptr<const scalar_t>(cls), as_ptr<const int32_t>(row_source),
                               image_stride, text_stride, image ? n_image : 0, text ? n_text : 0};
    launch_copy_rows<scalar_t>(op, as_ptr<scalar_t>(out), rows, D, vec_ok, src, sms, as_stream(stream));
  });
}

void gather_backward(ptr_t grad, long long rows, int D, ptr_t row_source, ptr_t grad_image, ptr_t image_row_of,
                     long long n_image, ptr_t grad_text, ptr_t text_row_of, long long n_text, ptr_t grad_cls,
                     ptr_t workspace, long long workspace_elems, int dtype, int device, ptr_t stream) {
  const char* op = "gather_backward";
  M3AE_CHECK(op, grad != 0 && row_source != 0, "grad and row_source are required");
  M3AE_CHECK(op, grad_image == 0 || image_row_of != 0, "grad_image needs image_row_of");
  M3AE_CHECK(op, grad_text == 0 || text_row_of != 0, "grad_text needs text_row_of");
  M3AE_CHECK(op, grad_cls == 0 || workspace != 0, "grad_cls needs a workspace");
  DeviceScope scope(op, device);
  const int sms = scope.sms;
  cudaStream_t st = as_stream(stream);
  M3AE_DISPATCH_FLOAT(op, dtype, {
    const scalar_t* g = as_ptr<const scalar_t>(grad);
    if (grad_image)
      launch_rows_by_index(op, as_ptr<scalar_t>(grad_image), n_image, g, rows, D, as_ptr<const int32_t>(image_row_of), sms, st);
    if (grad_text)
      launch_rows_by_index(op, as_ptr<scalar_t>(grad_text), n_text, g, rows, D, as_ptr<const int32_t>(text_row_of), sms, st);
    if (grad_cls) {
      launch_slot_sum<scalar_t, 1>(op, g, D, rows, D, ClsSlot{as_ptr<const int32_t>(row_source)},
                                   as_ptr<float>(workspace), workspace_elems, as_ptr<float>(grad_cls), st);
    }
  });
}

}  // namespace m3ae
