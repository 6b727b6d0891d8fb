// Shapes: N rows, D dim, K codes, R depth, C codebooks (1 when shared by all depths, else R).
//
// Declarations shared by the CPU translation unit (rq_ops.cpp: schemas, validation, CPU
// kernels) and the CUDA one (cuda/rq_cuda.cu). Kept free of <torch/extension.h> so the
// CUDA unit compiles in under a minute: it includes only ATen's core tensor header.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>

namespace megadual {

// Checks every argument of rq_encode and returns the number of codebooks C (1 = shared).
// Throws c10::ValueError (Python ValueError) naming the offending value and the fix.
int64_t check_rq_encode_args(const at::Tensor& x, const at::Tensor& codebooks, int64_t depth,
                             std::optional<at::ScalarType> codes_dtype);

// Checks every argument of rq_joint_encode (each part as rq_encode, plus the pairing: same rows,
// same K, same dtype, both codebooks shared or both per depth) and returns C.
int64_t check_rq_joint_encode_args(const at::Tensor& x_sem, const at::Tensor& x_pix, const at::Tensor& codebooks_sem,
                                   const at::Tensor& codebooks_pix, int64_t depth, double pixel_weight,
                                   std::optional<at::ScalarType> codes_dtype);

// Checks x / codebooks / codes for rq_code_stats and ema_update_ and returns the depth R
// (1 when codes is [N]). Validates that every code lies in [0, K) (one reduction over codes).
int64_t check_code_stats_args(const char* op, const at::Tensor& x, const at::Tensor& codebooks,
                              const at::Tensor& codes);

// Checks the EMA state tensors against the codebook shape ([K] / [K, D] or [R, K] / [R, K, D]).
void check_ema_state_args(const char* op, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                          const at::Tensor& codebook, double decay, double eps);

// ------------------------------------------------------------------------------------------
// Fused small-D nearest-code search (rq_fused_cpu.cpp): register-blocked dot products folded
// straight into a running (min, argmin) per row, never written to memory. Same arithmetic as
// the reference (one fp32 fma per component in increasing d, then ||e||^2 - 2 x.e), same
// ties (lowest index). x86-64 with AVX-512 or AVX2+FMA only; kNone means "use the GEMM path".

enum class FusedIsa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// Largest D the fused kernel takes (rq_encode uses it up to a smaller, measured crossover).
constexpr int64_t kFusedMaxD = 256;

// The best fused kernel this CPU can run (kNone without AVX2+FMA, off x86-64, or not GCC).
FusedIsa fused_isa_supported();

// Codes per packed panel (the register tile's width); K is padded up to a multiple of it.
int64_t fused_panel_codes(FusedIsa isa);

// Packs cb [K, D] (fp32) into panels [P, D, NR] (P = ceil(K / NR)) and norms [K] into
// packed_norms [P * NR]; padding codes are zero with norm +inf (never chosen).
void fused_pack_codebook(FusedIsa isa, const float* cb, const float* norms, int64_t K, int64_t D, float* packed,
                         float* packed_norms);

// out_idx[i] = argmin_k ||e_k||^2 - 2 x_i.e_k for the rows of x [rows, D] (fp32), ties to the
// lowest k. block_codes: codes per cache block (rounded up to whole panels).
void fused_nearest_codes(FusedIsa isa, const float* x, int64_t rows, int64_t D, const float* packed,
                         const float* packed_norms, int64_t K, int64_t block_codes, int64_t* out_idx);

}  // namespace megadual
