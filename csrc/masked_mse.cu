// masked_mse: weighted per-patch MSE of predictions against patches read straight from the raw
// image (uint8 normalised with mean/std in-kernel, or an already-normalised float image), patchified
// in (p, p, c) order on the fly, optionally with MAE's per-patch normalisation (unbiased variance).
// One warp per predicted patch on a persistent grid; the per-row losses are summed by a single
// block in a fixed order (deterministic). The backward recomputes the target (cheaper than
// storing it) and writes grad_pred = w * 2/P * (pred - target) * grad_loss.
#include "common.cuh"
#include "ops.h"

namespace m3ae {

namespace {

constexpr int kThreads = 256;  // 8 warps = 8 patches in flight per block
constexpr int kMaxChannels = 8;

struct Norm {
  float mean[kMaxChannels];
  float inv_std[kMaxChannels];  // target = (x / 255 - mean) * inv_std for uint8 images
};

struct PatchGeom {
  int C, H, W, p, gw, L, P, pp;  // pp = p * p, P = pp * C, L = patches per image
};

template <typename I>
__device__ __forceinline__ float load_pixel(const I* __restrict__ img, long long off, int c, const Norm& nrm) {
  if constexpr (std::is_same<I, uint8_t>::value) {
    return (static_cast<float>(__ldg(img + off)) * (1.f / 255.f) - nrm.mean[c]) * nrm.inv_std[c];
  } else {
    return to_float(img[off]);
  }
}

// Element e of the patch in image order (c, py, px): its image offset and its (p, p, c) column.
// PS = the patch size when known at compile time (16: divisions become shifts), 0 = runtime.
template <int PS>
__device__ __forceinline__ void patch_elem(const PatchGeom& g, long long img_base, int e, long long& off, int& col,
                                          int& c) {
  const int p = PS > 0 ? PS : g.p;
  const int pp = PS > 0 ? PS * PS : g.pp;
  c = e / pp;
  const int rem = e - c * pp;
  const int py = rem / p;
  const int px = rem - py * p;
  off = img_base + (static_cast<long long>(c) * g.H + py) * g.W + px;
  col = rem * g.C + c;  // (py * p + px) * C + c
}

// MODE 0: forward (row_loss[r] = w * mse); MODE 1: backward (grad_pred row).
template <int MODE, int PS, typename T, typename I>
__global__ void __launch_bounds__(kThreads) masked_mse_kernel(
    const T* __restrict__ pred, long long pred_stride, const I* __restrict__ img, PatchGeom g, Norm nrm,
    const int32_t* __restrict__ patch_index, const float* __restrict__ row_weight, long long rows, bool norm_pix,
    int B, float* __restrict__ row_loss, T* __restrict__ grad_pred, const float* __restrict__ grad_loss) {
  const int lane = threadIdx.x & 31;
  const long long warp0 = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const long long nwarps = (static_cast<long long>(gridDim.x) * blockDim.x) >> 5;
  const float inv_P = 1.f / static_cast<float>(g.P);
  const float gscale = MODE == 1 ? __ldg(grad_loss) : 0.f;
  for (long long r = warp0; r < rows; r += nwarps) {
    long long pi = __ldg(patch_index + r);
    const long long n_patches = static_cast<long long>(B) * g.L;
    pi = pi < 0 ? 0 : (pi >= n_patches ? n_patches - 1 : pi);
    const long long b = pi / g.L;
    const int l = static_cast<int>(pi - b * g.L);
    const int gy = l / g.gw, gx = l - (l / g.gw) * g.gw;
    const long long img_base =
        (b * g.C * g.H + static_cast<long long>(gy) * g.p) * g.W + static_cast<long long>(gx) * g.p;
    const T* prow = pred + r * pred_stride;
    const float w = __ldg(row_weight + r);

    float mu = 0.f, rstd = 1.f;
    if (norm_pix) {
      // shifted sums (shift = first element) keep the variance accurate in fp32
      long long off0;
      int col0, c0;
      patch_elem<PS>(g, img_base, 0, off0, col0, c0);
      const float shift = load_pixel(img, off0, c0, nrm);
      float s1 = 0.f, s2 = 0.f;
      for (int e = lane; e < g.P; e += 32) {
        long long off;
        int col, c;
        patch_elem<PS>(g, img_base, e, off, col, c);
        const float t = load_pixel(img, off, c, nrm) - shift;
        s1 += t;
        s2 += t * t;
      }
      s1 = warp_sum(s1);
      s2 = warp_sum(s2);
      const float var = (s2 - s1 * s1 * inv_P) / static_cast<float>(g.P > 1 ? g.P - 1 : 1);
      mu = shift + s1 * inv_P;
      rstd = rsqrtf(fmaxf(var, 0.f) + 1.0e-6f);
    }
    if (MODE == 0) {
      float acc = 0.f;
      for (int e = lane; e < g.P; e += 32) {
        long long off;
        int col, c;
        patch_elem<PS>(g, img_base, e, off, col, c);
        float t = load_pixel(img, off, c, nrm);
        if (norm_pix) t = (t - mu) * rstd;
        const float d = to_float(prow[col]) - t;
        acc += d * d;
      }
      acc = warp_sum(acc);
      if (lane == 0) row_loss[r] = w * (acc * inv_P);
    } else {
      const float scale = w * 2.f * inv_P * gscale;
      T* grow = grad_pred + r * g.P;
      for (int e = lane; e < g.P; e += 32) {
        long long off;
        int col, c;
        patch_elem<PS>(g, img_base, e, off, col, c);
        float t = load_pixel(img, off, c, nrm);
        if (norm_pix) t = (t - mu) * rstd;
        grow[col] = from_float<T>(scale * (to_float(prow[col]) - t));
      }
    }
  }
}

// out[0] = sum of x[0..n) in a fixed order (one block).
__global__ void __launch_bounds__(1024) sum_kernel(const float* __restrict__ x, long long n, float* __restrict__ out) {
  __shared__ float smem[32];
  float acc = 0.f;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) out[0] = acc;
}

template <int MODE>
void run(const char* op, ptr_t pred, long long pred_stride, int pred_dtype, ptr_t imgs, int img_dtype, int B, int C,
         int H, int W, int patch, ptr_t patch_index, ptr_t row_weight, long long rows, bool norm_pix,
         const std::vector<float>& mean, const std::vector<float>& std_, ptr_t row_loss, ptr_t loss,
         ptr_t grad_pred, ptr_t grad_loss, int device, ptr_t stream) {
  M3AE_CHECK(op, pred != 0 && imgs != 0 && patch_index != 0 && row_weight != 0, "missing input pointer");
  M3AE_CHECK(op, B > 0 && C > 0 && C <= kMaxChannels && patch > 0 && H % patch == 0 && W % patch == 0,
             "bad image geometry");
  Norm nrm{};
  if (img_dtype == kUInt8) {
    M3AE_CHECK(op, static_cast<int>(mean.size()) == C && static_cast<int>(std_.size()) == C,
               "uint8 images need mean and std with one value per channel");
    for (int c = 0; c < C; ++c) {
      nrm.mean[c] = mean[c];
      nrm.inv_std[c] = 1.f / std_[c];
    }
  }
  PatchGeom g{C, H, W, patch, W / patch, (H / patch) * (W / patch), patch * patch * C, patch * patch};
  DeviceScope scope(op, device);
  const int sms = scope.sms;
  cudaStream_t st = as_stream(stream);
  if (MODE == 0) {  // zero rows: the loss is 0 (written by the sum below)
    M3AE_CHECK(op, loss != 0 && (row_loss != 0 || rows == 0), "row_loss and loss are required");
  }
  if (rows > 0) {
  const int grid = persistent_blocks(rows, kThreads / 32, sms, 8);
  M3AE_DISPATCH_FLOAT(op, pred_dtype, {
    using T = scalar_t;
    auto launch = [&](auto img_tag) {
      using I = typename decltype(img_tag)::type;
      auto kernel = patch == 16 ? masked_mse_kernel<MODE, 16, T, I> : masked_mse_kernel<MODE, 0, T, I>;
      kernel<<<grid, kThreads, 0, st>>>(
          as_ptr<const T>(pred), pred_stride, as_ptr<const I>(imgs), g, nrm, as_ptr<const int32_t>(patch_index),
          as_ptr<const float>(row_weight), rows, norm_pix, B, as_ptr<float>(row_loss), as_ptr<T>(grad_pred),
          as_ptr<const float>(grad_loss));
      M3AE_LAUNCH_CHECK(op);
    };
    switch (img_dtype) {
      case kUInt8: launch(std::common_type<uint8_t>{}); break;
      case kFloat32: launch(std::common_type<float>{}); break;
      case kBFloat16: launch(std::common_type<__nv_bfloat16>{}); break;
      case kFloat16: launch(std::common_type<__half>{}); break;
      default:
        throw OpError(std::string("m3ae_engine._C.") + op + ": unsupported image dtype " + dtype_name(img_dtype));
    }
  });
  }
  if (MODE == 0) {
    sum_kernel<<<1, 1024, 0, st>>>(as_ptr<const float>(row_loss), rows, as_ptr<float>(loss));
    M3AE_LAUNCH_CHECK(op);
  }
}

}  // namespace

void masked_mse_forward(ptr_t pred, long long pred_stride, int pred_dtype, ptr_t imgs, int img_dtype, int B, int C,
                        int H, int W, int patch, ptr_t patch_index, ptr_t row_weight, long long rows,
                        bool norm_pix, const std::vector<float>& mean, const std::vector<float>& std_,
                        ptr_t row_loss, ptr_t loss, int device, ptr_t stream) {
  const char* op = "masked_mse_forward";
  run<0>(op, pred, pred_stride, pred_dtype, imgs, img_dtype, B, C, H, W, patch, patch_index, row_weight, rows,
         norm_pix, mean, std_, row_loss, loss, 0, 0, device, stream);
}

void masked_mse_backward(ptr_t grad_pred, ptr_t pred, long long pred_stride, int pred_dtype, ptr_t imgs,
                         int img_dtype, int B, int C, int H, int W, int patch, ptr_t patch_index, ptr_t row_weight,
                         long long rows, bool norm_pix, const std::vector<float>& mean,
                         const std::vector<float>& std_, ptr_t grad_loss, int device, ptr_t stream) {
  const char* op = "masked_mse_backward";
  M3AE_CHECK(op, grad_pred != 0 && grad_loss != 0, "grad_pred and grad_loss are required");
  run<1>(op, pred, pred_stride, pred_dtype, imgs, img_dtype, B, C, H, W, patch, patch_index, row_weight, rows,
         norm_pix, mean, std_, 0, 0, grad_pred, grad_loss, device, stream);
}

}  // namespace m3ae
