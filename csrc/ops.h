// Host entry points of the m3ae-engine CUDA kernels (one group per .cu file), bound in binding.cpp.
// Pointers are device addresses passed from Python as ints; `stream` is a cudaStream_t as an int
// (torch.cuda.current_stream().cuda_stream); dtype codes are m3ae::DType.
#pragma once

#include <cstdint>
#include <vector>

namespace m3ae {
using ptr_t = std::uintptr_t;

// dtype codes shared with m3ae_engine/cuda_backend.py (_DTYPE_CODES)
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kUInt8 = 3 };

int reduce_chunk_rows();

// gather.cu ------------------------------------------------------------------------------------
// out[t] = row_source[t] == -2: 0 | -1: cls (0 if cls == 0) | < n_image: image[s] | else text[s - n_image]
void gather_forward(ptr_t out, ptr_t image, long long image_stride, long long n_image, ptr_t text,
                    long long text_stride, long long n_text, ptr_t cls, ptr_t row_source, long long rows, int D,
                    int dtype, int device, ptr_t stream);
// grad_image[i] = image_row_of[i] >= 0 ? grad[image_row_of[i]] : 0 (same for text);
// grad_cls[:] (fp32) = sum of grad rows whose source is -1. Null outputs are skipped.
void gather_backward(ptr_t grad, long long rows, int D, ptr_t row_source, ptr_t grad_image, ptr_t image_row_of,
                     long long n_image, ptr_t grad_text, ptr_t text_row_of, long long n_text, ptr_t grad_cls,
                     ptr_t workspace, long long workspace_elems, int dtype, int device, ptr_t stream);

// unshuffle.cu ---------------------------------------------------------------------------------
void unshuffle_forward(ptr_t out, ptr_t visible, long long visible_stride, long long n_visible, ptr_t mask_tokens,
                       ptr_t type_embeddings, ptr_t pos_table, long long n_pos, ptr_t row_visible, ptr_t row_kind,
                       ptr_t row_pos, long long rows, int D, int dtype, int device, ptr_t stream);
// grad_visible[t] = row_of_visible[t] >= 0 ? grad[row_of_visible[t]] : 0;
// grad_mask (fp32 [2, D]) and grad_type (fp32 [2, D], may be null) summed by kind.
void unshuffle_backward(ptr_t grad, long long rows, int D, ptr_t row_visible, ptr_t row_kind, ptr_t grad_visible,
                        ptr_t row_of_visible, long long n_visible, ptr_t grad_mask, ptr_t grad_type,
                        ptr_t workspace, long long workspace_elems, int dtype, int device, ptr_t stream);

// masked_mse.cu --------------------------------------------------------------------------------
// loss (fp32 scalar) = sum_r w[r] * mean_j (pred[r, j] - target[r, j])^2, target patch patch_index[r]
// of imgs [B, C, H, W] in (p, p, c) order; uint8 images are normalised with mean/std.
void masked_mse_forward(ptr_t pred, long long pred_stride, int pred_dtype, ptr_t imgs, int img_dtype, int B, int C,
                        int H, int W, int patch, ptr_t patch_index, ptr_t row_weight, long long rows,
                        bool norm_pix, const std::vector<float>& mean, const std::vector<float>& std_,
                        ptr_t row_loss, ptr_t loss, int device, ptr_t stream);
// grad_pred[r, j] = w[r] * 2 / P * (pred - target) * grad_loss[0]
void masked_mse_backward(ptr_t grad_pred, ptr_t pred, long long pred_stride, int pred_dtype, ptr_t imgs,
                         int img_dtype, int B, int C, int H, int W, int patch, ptr_t patch_index, ptr_t row_weight,
                         long long rows, bool norm_pix, const std::vector<float>& mean,
                         const std::vector<float>& std_, ptr_t grad_loss, int device, ptr_t stream);

// masked_linear_cross_entropy.cu -----------------------------------------------------------------
// For each row of logits [n, V] (+ bias): row_loss = w * (lse - x_t), row_correct = w * [argmax == t];
// with write_grad, the row is overwritten in place by w * (softmax - onehot(t)).
void lce_softmax(ptr_t logits, long long ld, int dtype, ptr_t bias, ptr_t targets, ptr_t row_weight, long long n,
                 long long V, ptr_t row_loss, ptr_t row_correct, bool write_grad, int device, ptr_t stream);

}  // namespace m3ae
