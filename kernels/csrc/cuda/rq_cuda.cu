// Shapes: N rows, D dim, K codes, R depth, C codebooks (1 when shared by all depths, else R).
//
// CUDA kernels of megadual::rq_encode, megadual::rq_joint_encode and megadual::rq_code_stats. Same semantics as the CPU
// kernels in ../rq_ops.cpp and the reference in megadual/ops/reference.py: greedy residual
// search, squared euclidean distance as ||e||^2 - 2 x.e, ties to the lowest index, fp32
// accumulation whatever the input dtype.
//
// The distance search multiplies a tile of residuals by a tile of codes with cuBLAS
// (at::mm_out into a scratch of at most kDotsBudget floats) and folds each tile into a running
// per-row argmin; the N x K matrix of a whole batch is never materialised. Includes are kept
// to ATen's core headers (no <torch/extension.h>, no <ATen/cuda/CUDAContext.h>, which needs
// cusparse.h) so nvcc compiles this unit in under a minute, also on CPU-only CI machines.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../rq.h"

namespace megadual {
namespace {

// Scratch for one tile of dot products: 16M fp32 = 64 MiB. For the DualToken shape
// (K = 16384) that is 1024 rows per GEMM, large enough to keep cuBLAS busy.
constexpr int64_t kDotsBudget = int64_t{1} << 24;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 256;

int64_t grid_for(int64_t total) {
  // Grid-stride loops below; a few waves of blocks is plenty.
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{65535}));
}

// One warp per row: lanes stride over the tile's codes (coalesced reads of a row of dots),
// each lane keeps its first minimum (strict <, increasing k), lanes merge by (value, index),
// and the tile replaces the running best only when strictly smaller (earlier tiles hold
// smaller indices). fmaf(-2, dot, norm) rounds exactly like `norm - 2 * dot`: -2*dot is exact.
__global__ void argmin_merge_kernel(const float* __restrict__ dots, const float* __restrict__ norms, int64_t rows,
                                    int64_t kk, int64_t k0, float* __restrict__ best_val,
                                    int64_t* __restrict__ best_idx) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform: the shuffles below always see a full warp
  const float* d = dots + row * kk;
  float bv = std::numeric_limits<float>::infinity();
  long long bi = 0;
  for (int64_t k = lane; k < kk; k += 32) {
    const float v = fmaf(-2.0f, d[k], norms[k]);
    if (v < bv) {
      bv = v;
      bi = k;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_down_sync(0xffffffffu, bv, off);
    const long long oi = __shfl_down_sync(0xffffffffu, bi, off);
    if (ov < bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0 && bv < best_val[row]) {
    best_val[row] = bv;
    best_idx[row] = k0 + bi;
  }
}

// After depth r's search: record the code (unless `codes` is null), subtract it from the
// residual, add it to the running quantized sum (and store that sum when cumulative outputs
// were asked for).
__global__ void apply_codes_kernel(float* __restrict__ res, float* __restrict__ quant, const float* __restrict__ cb,
                                   const int64_t* __restrict__ best_idx, int64_t rows, int64_t D,
                                   float* __restrict__ cum, int64_t* __restrict__ codes, int64_t depth, int64_t r) {
  const int64_t total = rows * D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, d = i - n * D;
    const int64_t c = best_idx[n];
    const float e = cb[c * D + d];
    res[i] = res[i] - e;
    const float q = quant[i] + e;
    quant[i] = q;
    if (cum != nullptr) cum[i] = q;
    if (codes != nullptr && d == 0) codes[n * depth + r] = c;
  }
}

// Counts and sums per code. One thread per (row, column): the residual of a column is
// elementwise, so it is recomputed depth by depth from the codebook instead of being stored.
// fp32 atomics: the summation order (and so the last bits) varies from run to run.
__global__ void code_stats_kernel(const float* __restrict__ x, const int64_t* __restrict__ codes,
                                  const float* __restrict__ cb, float* __restrict__ counts, float* __restrict__ sums,
                                  int64_t N, int64_t D, int64_t K, int64_t R, int64_t C) {
  const int64_t total = N * D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, d = i - n * D;
    float res = x[i];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = (C == 1 ? 0 : r) * K + codes[n * R + r];
      atomicAdd(sums + row * D + d, res);
      if (d == 0) atomicAdd(counts + row, 1.0f);
      res = res - cb[row * D + d];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rq_encode_cuda(const at::Tensor& x, const at::Tensor& codebooks,
                                                              int64_t depth, bool return_cumulative,
                                                              std::optional<at::ScalarType> codes_dtype,
                                                              int64_t tile_n, int64_t tile_k) {
  const int64_t C = check_rq_encode_args(x, codebooks, depth, codes_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1), K = codebooks.size(-2);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor cbf = codebooks.to(at::kFloat).contiguous();
  const at::Tensor norms = cbf.mul(cbf).sum(-1).contiguous();
  const int64_t tk = std::min(K, tile_k > 0 ? tile_k : K);
  const int64_t tn = std::min(N, tile_n > 0 ? tile_n : std::max<int64_t>(1, kDotsBudget / tk));

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor codes = at::empty({N, depth}, x.options().dtype(at::kLong));
  at::Tensor quant = at::empty({N, D}, f32);
  at::Tensor cum = return_cumulative ? at::empty({depth, N, D}, f32) : at::Tensor();
  at::Tensor dots = at::empty({tn * tk}, f32);
  at::Tensor res = at::empty({tn, D}, f32);
  at::Tensor best_val = at::empty({tn}, f32);
  at::Tensor best_idx = at::empty({tn}, x.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    at::Tensor res_rows = res.narrow(0, 0, rows);
    res_rows.copy_(xf.narrow(0, n0, rows));
    quant.narrow(0, n0, rows).zero_();
    for (int64_t r = 0; r < depth; ++r) {
      const int64_t c = C == 1 ? 0 : r;
      const at::Tensor cb_c = C == 1 ? cbf : cbf.select(0, c);
      best_val.fill_(std::numeric_limits<float>::infinity());
      best_idx.zero_();
      for (int64_t k0 = 0; k0 < K; k0 += tk) {
        const int64_t kk = std::min(tk, K - k0);
        at::Tensor out = dots.narrow(0, 0, rows * kk).view({rows, kk});
        at::mm_out(out, res_rows, cb_c.narrow(0, k0, kk).t());
        const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
        argmin_merge_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
            out.const_data_ptr<float>(), norms.const_data_ptr<float>() + c * K + k0, rows, kk, k0,
            best_val.mutable_data_ptr<float>(), best_idx.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      apply_codes_kernel<<<grid_for(rows * D), kThreads, 0, stream>>>(
          res.mutable_data_ptr<float>(), quant.mutable_data_ptr<float>() + n0 * D,
          cbf.const_data_ptr<float>() + c * K * D, best_idx.const_data_ptr<int64_t>(), rows, D,
          return_cumulative ? cum.mutable_data_ptr<float>() + (r * N + n0) * D : nullptr,
          codes.mutable_data_ptr<int64_t>() + n0 * depth, depth, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor quantized = quant.to(x.scalar_type());
  at::Tensor cumulative = return_cumulative ? cum.to(x.scalar_type()) : at::empty({0}, x.options());
  if (codes_dtype.has_value() && *codes_dtype == at::kInt) codes = codes.to(at::kInt);
  return {codes, quantized, cumulative};
}

// The shared-index search of rq_joint_encode: per depth, the rows [r_sem, w r_pix] against the
// concatenated codes [e_sem, e_pix] with norms ||e_sem||^2 + w ||e_pix||^2 (the reference's
// expressions), through the same GEMM tiles and argmin kernel as rq_encode; each part then
// subtracts its own code from its own (unweighted) residual.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rq_joint_encode_cuda(
    const at::Tensor& x_sem, const at::Tensor& x_pix, const at::Tensor& codebooks_sem,
    const at::Tensor& codebooks_pix, int64_t depth, double pixel_weight, bool return_cumulative,
    std::optional<at::ScalarType> codes_dtype) {
  const int64_t C = check_rq_joint_encode_args(x_sem, x_pix, codebooks_sem, codebooks_pix, depth, pixel_weight,
                                               codes_dtype);
  const c10::cuda::CUDAGuard guard(x_sem.device());
  const int64_t N = x_sem.size(0), Ds = x_sem.size(1), Dp = x_pix.size(1), K = codebooks_sem.size(-2);
  const at::Tensor cb_sem = codebooks_sem.to(at::kFloat).contiguous(), cb_pix = codebooks_pix.to(at::kFloat).contiguous();
  const at::Tensor joint = at::cat({cb_sem, cb_pix}, -1).contiguous();
  const at::Tensor norms = cb_sem.mul(cb_sem).sum(-1).add(cb_pix.mul(cb_pix).sum(-1).mul(pixel_weight)).contiguous();
  const int64_t tk = K;
  const int64_t tn = std::min(N, std::max<int64_t>(1, kDotsBudget / tk));

  const auto f32 = x_sem.options().dtype(at::kFloat);
  at::Tensor codes = at::empty({N, depth}, x_sem.options().dtype(at::kLong));
  at::Tensor quant_sem = at::empty({N, Ds}, f32), quant_pix = at::empty({N, Dp}, f32);
  at::Tensor cum_sem = return_cumulative ? at::empty({depth, N, Ds}, f32) : at::Tensor();
  at::Tensor cum_pix = return_cumulative ? at::empty({depth, N, Dp}, f32) : at::Tensor();
  const at::Tensor xs = x_sem.to(at::kFloat).contiguous(), xp = x_pix.to(at::kFloat).contiguous();
  at::Tensor dots = at::empty({tn * tk}, f32);
  at::Tensor res_sem = at::empty({tn, Ds}, f32), res_pix = at::empty({tn, Dp}, f32), q = at::empty({tn, Ds + Dp}, f32);
  at::Tensor best_val = at::empty({tn}, f32);
  at::Tensor best_idx = at::empty({tn}, x_sem.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    at::Tensor rs = res_sem.narrow(0, 0, rows), rp = res_pix.narrow(0, 0, rows), qr = q.narrow(0, 0, rows);
    rs.copy_(xs.narrow(0, n0, rows));
    rp.copy_(xp.narrow(0, n0, rows));
    quant_sem.narrow(0, n0, rows).zero_();
    quant_pix.narrow(0, n0, rows).zero_();
    for (int64_t r = 0; r < depth; ++r) {
      const int64_t c = C == 1 ? 0 : r;
      qr.narrow(1, 0, Ds).copy_(rs);
      at::Tensor weighted_pix = qr.narrow(1, Ds, Dp);
      at::mul_out(weighted_pix, rp, pixel_weight);
      at::Tensor out = dots.narrow(0, 0, rows * tk).view({rows, tk});
      at::mm_out(out, qr, (C == 1 ? joint : joint.select(0, c)).t());
      best_val.fill_(std::numeric_limits<float>::infinity());
      best_idx.zero_();
      const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
      argmin_merge_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
          out.const_data_ptr<float>(), norms.const_data_ptr<float>() + c * K, rows, tk, 0,
          best_val.mutable_data_ptr<float>(), best_idx.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      for (auto [res, quant, cb, cum, D, codes_out] :
           {std::tuple{&res_sem, &quant_sem, &cb_sem, &cum_sem, Ds, codes.mutable_data_ptr<int64_t>() + n0 * depth},
            std::tuple{&res_pix, &quant_pix, &cb_pix, &cum_pix, Dp, static_cast<int64_t*>(nullptr)}}) {
        apply_codes_kernel<<<grid_for(rows * D), kThreads, 0, stream>>>(
            res->mutable_data_ptr<float>(), quant->mutable_data_ptr<float>() + n0 * D,
            cb->const_data_ptr<float>() + c * K * D, best_idx.const_data_ptr<int64_t>(), rows, D,
            return_cumulative ? cum->mutable_data_ptr<float>() + (r * N + n0) * D : nullptr, codes_out, depth, r);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
  const auto out_type = x_sem.scalar_type();
  const at::Tensor none = at::empty({0}, x_sem.options());
  if (codes_dtype.has_value() && *codes_dtype == at::kInt) codes = codes.to(at::kInt);
  return {codes, quant_sem.to(out_type), quant_pix.to(out_type), return_cumulative ? cum_sem.to(out_type) : none,
          return_cumulative ? cum_pix.to(out_type) : none};
}

std::tuple<at::Tensor, at::Tensor> rq_code_stats_cuda(const at::Tensor& x, const at::Tensor& codebooks,
                                                      const at::Tensor& codes) {
  const int64_t R = check_code_stats_args("rq_code_stats", x, codebooks, codes);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1), K = codebooks.size(-2);
  const int64_t C = codebooks.dim() == 2 ? 1 : codebooks.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor cbf = codebooks.to(at::kFloat).contiguous();
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor counts = at::zeros(codebooks.sizes().slice(0, codebooks.dim() - 1), f32);
  at::Tensor sums = at::zeros(codebooks.sizes(), f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  code_stats_kernel<<<grid_for(N * D), kThreads, 0, stream>>>(
      xf.const_data_ptr<float>(), codes64.const_data_ptr<int64_t>(), cbf.const_data_ptr<float>(),
      counts.mutable_data_ptr<float>(), sums.mutable_data_ptr<float>(), N, D, K, R, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, sums};
}

}  // namespace
}  // namespace megadual

TORCH_LIBRARY_IMPL(megadual, CUDA, m) {
  m.impl("rq_encode", &megadual::rq_encode_cuda);
  m.impl("rq_joint_encode", &megadual::rq_joint_encode_cuda);
  m.impl("rq_code_stats", &megadual::rq_code_stats_cuda);
}
