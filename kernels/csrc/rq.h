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

// Checks x / codebooks / codes for rq_code_stats and ema_update_ and returns the depth R
// (1 when codes is [N]). Validates that every code lies in [0, K) (one reduction over codes).
int64_t check_code_stats_args(const char* op, const at::Tensor& x, const at::Tensor& codebooks,
                              const at::Tensor& codes);

// Checks the EMA state tensors against the codebook shape ([K] / [K, D] or [R, K] / [R, K, D]).
void check_ema_state_args(const char* op, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                          const at::Tensor& codebook, double decay, double eps);

}  // namespace megadual
