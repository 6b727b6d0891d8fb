// Shapes: N rows, D dim, K codes, R depth, C codebooks (1 when shared by all depths, else R).
//
// The megadual op schemas, their argument checks, and the CPU kernels of batched residual
// quantization (RQ) and EMA codebook updates. The small-D nearest-code search is the fused
// kernel of rq_fused_cpu.cpp; larger D uses GEMM tiles here. CUDA kernels live in cuda/rq_cuda.cu; the ops
// that are plain ATen compositions (EMA apply on CUDA, dead-code restart) are registered here
// for every device. The PyTorch reference in megadual/ops/reference.py defines the semantics
// and is the test oracle: keep the two in step.

#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include "rq.h"

namespace megadual {

namespace {

// Rows of x per parallel work item, and codes per distance tile. At D=256 a 128 x 1024 tile
// (512 KiB of dots, in a core's L2) is ~34 MFLOP per GEMM call. At small D the same tile is
// only ~8 MFLOP and the per-call overhead of at::mm_out shows (measured: 256 x 2048 ran the
// DualToken shape D=32, K=16384 ~1.5x faster than 128 x 1024), so small D gets a bigger tile.
constexpr int64_t kTileN = 128;
constexpr int64_t kTileK = 1024;
constexpr int64_t kSmallD = 64;
constexpr int64_t kTileNSmallD = 256;
constexpr int64_t kTileKSmallD = 2048;
// The fused search (rq_fused_cpu.cpp) for D up to kFusedCrossoverD: it never writes a dot
// tile, which at small D is what bounds the GEMM path (memory, not arithmetic). Its rows per
// work item, and codes per cache block: ~64 KiB of packed codes (2048 codes at D=32), which
// stay in L2 while every row tile of the work item passes over them.
constexpr int64_t kFusedCrossoverD = 256;
constexpr int64_t kFusedTileN = 256;
constexpr int64_t kFusedBlockFloats = 65536;

// Which CPU search rq_encode runs: the fused kernel where the CPU has one and D is small
// enough, else the GEMM-tiled one. MEGADUAL_RQ_CPU_KERNEL=gemm|avx2|avx512 forces one (for
// tests and benchmarks; a fused ISA this CPU lacks falls back to the GEMM path). Read per call.
FusedIsa choose_search(int64_t D) {
  static const FusedIsa best = fused_isa_supported();
  if (D > kFusedMaxD) return FusedIsa::kNone;
  const char* env = std::getenv("MEGADUAL_RQ_CPU_KERNEL");
  const std::string want = env != nullptr ? env : "";
  if (want == "gemm") return FusedIsa::kNone;
  if (want == "avx2") return best != FusedIsa::kNone ? FusedIsa::kAvx2 : FusedIsa::kNone;
  if (want == "avx512") return best == FusedIsa::kAvx512 ? FusedIsa::kAvx512 : FusedIsa::kNone;
  TORCH_CHECK_VALUE(want.empty() || want == "auto", "MEGADUAL_RQ_CPU_KERNEL must be auto, gemm, avx2 or avx512, got '",
                    want, "'");
  return D <= kFusedCrossoverD ? best : FusedIsa::kNone;
}
// Lanes of the vectorised argmin (one AVX-512 register of fp32; two AVX2 ones).
constexpr int kLanes = 16;

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// For one tile of distances (rows x kk dot products against codes k0 .. k0+kk), folds the
// tile's nearest code into (best_val, best_idx). Distance is ||e||^2 - 2 x.e: ||x||^2 is the
// same for every code of a row, so it cannot change the argmin. -2*dot is exact in fp32,
// so fused or not the value rounds exactly like the reference's `norms - 2 * dots`.
// Ties go to the lowest index: each lane scans increasing k with a strict <, lanes are
// merged by (value, index), the scalar tail only has larger indices, and an earlier tile
// (smaller indices) is replaced only by a strictly smaller distance.
//
// GCC vector types keep the per-lane minima in registers (a `#pragma omp simd` loop over
// lane arrays spilled them to the stack every step: 2.3x slower), and two independent
// chains of 16 lanes hide the compare-blend latency. target_clones compiles an AVX-512, an
// AVX2 and a baseline version and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
typedef float lanes_f __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t lanes_i __attribute__((vector_size(kLanes * sizeof(int32_t))));

__attribute__((target_clones("avx512f", "avx2", "default")))
void argmin_merge_tile(const float* dots, const float* norms, int64_t rows, int64_t kk, int64_t k0,
                       float* best_val, int64_t* best_idx) {
  const float inf = std::numeric_limits<float>::infinity();
  lanes_i lane0;
  for (int j = 0; j < kLanes; ++j) lane0[j] = j;
  for (int64_t i = 0; i < rows; ++i) {
    const float* d = dots + i * kk;
    lanes_f val_a = inf - lanes_f{}, val_b = inf - lanes_f{};
    lanes_i idx_a = lanes_i{}, idx_b = lanes_i{};
    lanes_i at_a = lane0, at_b = lane0 + kLanes;
    int64_t k = 0;
    for (; k + 2 * kLanes <= kk; k += 2 * kLanes) {
      lanes_f da, db, na, nb;
      std::memcpy(&da, d + k, sizeof(da));
      std::memcpy(&db, d + k + kLanes, sizeof(db));
      std::memcpy(&na, norms + k, sizeof(na));
      std::memcpy(&nb, norms + k + kLanes, sizeof(nb));
      const lanes_f va = na - 2.0f * da, vb = nb - 2.0f * db;
      const lanes_i better_a = va < val_a, better_b = vb < val_b;
      val_a = better_a ? va : val_a;
      idx_a = better_a ? at_a : idx_a;
      val_b = better_b ? vb : val_b;
      idx_b = better_b ? at_b : idx_b;
      at_a += 2 * kLanes;
      at_b += 2 * kLanes;
    }
    float tile_val = inf;
    int64_t tile_idx = 0;
    for (int j = 0; j < kLanes; ++j) {
      for (int h = 0; h < 2; ++h) {
        const float v = h ? val_b[j] : val_a[j];
        const int64_t ix = h ? idx_b[j] : idx_a[j];
        if (v < tile_val || (v == tile_val && ix < tile_idx)) {
          tile_val = v;
          tile_idx = ix;
        }
      }
    }
    for (; k < kk; ++k) {
      const float v = norms[k] - 2.0f * d[k];
      if (v < tile_val) {
        tile_val = v;
        tile_idx = k;
      }
    }
    if (tile_val < best_val[i]) {
      best_val[i] = tile_val;
      best_idx[i] = k0 + tile_idx;
    }
  }
}
#else
void argmin_merge_tile(const float* dots, const float* norms, int64_t rows, int64_t kk, int64_t k0,
                       float* best_val, int64_t* best_idx) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* d = dots + i * kk;
    float tile_val = std::numeric_limits<float>::infinity();
    int64_t tile_idx = 0;
    for (int64_t k = 0; k < kk; ++k) {
      const float v = norms[k] - 2.0f * d[k];
      if (v < tile_val) {
        tile_val = v;
        tile_idx = k;
      }
    }
    if (tile_val < best_val[i]) {
      best_val[i] = tile_val;
      best_idx[i] = k0 + tile_idx;
    }
  }
}
#endif

// Per-code counts and sums of the vectors assigned to each code. With codes [N, R] the
// vector fed to depth r is the residual x - sum_{j<r} e[codes[:, j]], recomputed here from
// the codebook instead of being stored (R x N x D would be 8x the input at DualToken's R).
template <typename scalar_t>
void accumulate_code_stats_cpu(const at::Tensor& x, const at::Tensor& cbf, const at::Tensor& codes64,
                               int64_t num_codebooks, float* counts, float* sums) {
  const int64_t N = x.size(0), D = x.size(1), R = codes64.size(1), K = cbf.size(-2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const float* cb = cbf.const_data_ptr<float>();
  const int64_t* cp = codes64.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t c = num_codebooks == 1 ? 0 : r;
      counts[c * K + cp[n * R + r]] += 1.0f;
    }
  }
  // Columns are independent (the residual is elementwise), so threads split D: no two
  // threads ever touch the same sum, and no thread recomputes another's residuals.
  at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
    const int64_t w = d1 - d0;
    std::vector<float> res(w);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* xrow = xp + n * D + d0;
      for (int64_t j = 0; j < w; ++j) res[j] = static_cast<float>(xrow[j]);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t c = num_codebooks == 1 ? 0 : r;
        const int64_t row = (c * K + cp[n * R + r]) * D + d0;
        float* s = sums + row;
        const float* e = cb + row;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) {
          s[j] += res[j];
          res[j] -= e[j];
        }
      }
    }
  });
}

// cluster_size <- decay * cluster_size + (1 - decay) * counts, same for embed_sum, then
// codebook <- embed_sum / smoothed count, where the Laplace-smoothed count
// (c + eps) / (n + K * eps) * n keeps rarely used codes from dividing by ~0 while
// preserving the total n.
void ema_apply_cpu_impl(float* cs, float* es, float* cb, const float* counts, const float* sums,
                        int64_t num_codebooks, int64_t K, int64_t D, double decay, double eps) {
  const float a = static_cast<float>(decay), b = static_cast<float>(1.0 - decay);
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < num_codebooks; ++c) {
    float* csc = cs + c * K;
    const float* cnt = counts + c * K;
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      csc[k] = a * csc[k] + b * cnt[k];
      total += csc[k];
    }
    const float n = static_cast<float>(total);
    const float denom = n + static_cast<float>(K) * e;
    at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const float smoothed = (csc[k] + e) / denom * n;
        const int64_t off = (c * K + k) * D;
        float* esr = es + off;
        float* cbr = cb + off;
        const float* sr = sums + off;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          esr[d] = a * esr[d] + b * sr[d];
          cbr[d] = esr[d] / smoothed;
        }
      }
    });
  }
}

// The nearest-code search of one depth against one of C codebooks, set up once per call: the
// fused kernel (rq_fused_cpu.cpp) over codebooks packed into register-tile panels where the CPU
// has one and D is small enough, otherwise GEMM tiles of tk codes each folded by
// argmin_merge_tile. The distance is norms[c, k] - 2 q.e_k: rq_encode passes ||e||^2, the joint
// search ||e_sem||^2 + w ||e_pix||^2 over concatenated codes.
class CodeSearch {
 public:
  // cbf: fp32 codebooks [C, K, D] (or [K, D] when C = 1); norms: [C, K] (or [K]). N rows will be
  // searched; tile_n / tile_k of 0 pick the tuned defaults.
  CodeSearch(const at::Tensor& cbf, const at::Tensor& norms, int64_t C, int64_t N, int64_t tile_n, int64_t tile_k)
      : norms_(norms), C_(C), K_(cbf.size(-2)), D_(cbf.size(-1)), isa_(choose_search(D_)) {
    const bool fused = isa_ != FusedIsa::kNone;
    // Fused: tn rows per work item, tk codes per cache block. GEMM: tn x tk dot tiles.
    // (The fused search has no per-call overhead to amortise: small batches still split into at
    // least two work items per thread.)
    const int64_t fused_tn = std::clamp<int64_t>(
        (N + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads()), 16, kFusedTileN);
    const bool small_d = D_ <= kSmallD;
    const int64_t default_tn = fused ? fused_tn : (small_d ? kTileNSmallD : kTileN);
    const int64_t default_tk = fused ? std::max<int64_t>(64, kFusedBlockFloats / D_) : (small_d ? kTileKSmallD : kTileK);
    tn_ = std::min(N, tile_n > 0 ? tile_n : default_tn);
    tk_ = std::min(K_, tile_k > 0 ? tile_k : default_tk);
    if (fused) {
      TORCH_CHECK(K_ <= std::numeric_limits<int32_t>::max() - 64, "rq_encode: K=", K_, " codes is too many");
      const int64_t panel = fused_panel_codes(isa_);
      packed_k_ = (K_ + panel - 1) / panel * panel;
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      packed_ = at::empty({C_, packed_k_ * D_}, f32);
      packed_norms_ = at::empty({C_, packed_k_}, f32);
      for (int64_t c = 0; c < C_; ++c) {
        fused_pack_codebook(isa_, cbf.const_data_ptr<float>() + c * K_ * D_, norms.const_data_ptr<float>() + c * K_,
                            K_, D_, packed_.mutable_data_ptr<float>() + c * packed_k_ * D_,
                            packed_norms_.mutable_data_ptr<float>() + c * packed_k_);
      }
      return;
    }
    // Views built once: the transposed codebook tiles each GEMM multiplies against.
    num_k_tiles_ = (K_ + tk_ - 1) / tk_;
    for (int64_t c = 0; c < C_; ++c) {
      const at::Tensor cb_c = C_ == 1 ? cbf : cbf.select(0, c);
      for (int64_t t = 0; t < num_k_tiles_; ++t) {
        cb_tiles_.push_back(cb_c.narrow(0, t * tk_, std::min(tk_, K_ - t * tk_)).t());
      }
    }
  }

  int64_t rows_per_block() const { return tn_; }

  // A work item's scratch for the GEMM path's dot tiles (empty for the fused search).
  at::Tensor make_scratch() const {
    return at::empty({isa_ != FusedIsa::kNone ? 0 : tn_ * tk_}, at::TensorOptions().dtype(at::kFloat));
  }

  // best_idx[i] = the nearest code of codebook c to row i of q (fp32 [rows, D], contiguous; a
  // view of `q_t`, which the GEMM path multiplies), ties to the lowest index.
  void nearest(int64_t c, const at::Tensor& q_t, int64_t rows, at::Tensor& scratch, float* best_val,
               int64_t* best_idx) const {
    if (isa_ != FusedIsa::kNone) {
      fused_nearest_codes(isa_, q_t.const_data_ptr<float>(), rows, D_,
                          packed_.const_data_ptr<float>() + c * packed_k_ * D_,
                          packed_norms_.const_data_ptr<float>() + c * packed_k_, K_, tk_, best_idx);
      return;
    }
    std::fill(best_val, best_val + rows, std::numeric_limits<float>::infinity());
    std::fill(best_idx, best_idx + rows, 0);
    const float* normp = norms_.const_data_ptr<float>() + c * K_;
    for (int64_t t = 0; t < num_k_tiles_; ++t) {
      const int64_t k0 = t * tk_, kk = std::min(tk_, K_ - k0);
      at::Tensor out = scratch.narrow(0, 0, rows * kk).view({rows, kk});
      at::mm_out(out, q_t, cb_tiles_[c * num_k_tiles_ + t]);
      argmin_merge_tile(scratch.const_data_ptr<float>(), normp + k0, rows, kk, k0, best_val, best_idx);
    }
  }

 private:
  at::Tensor norms_;
  int64_t C_, K_, D_;
  FusedIsa isa_;
  int64_t tn_ = 0, tk_ = 0;
  int64_t packed_k_ = 0, num_k_tiles_ = 0;
  at::Tensor packed_, packed_norms_;
  std::vector<at::Tensor> cb_tiles_;  // [C * num_k_tiles], each [D, kk]
};

// The greedy search over blocks of rows; see rq_encode_cpu. A function rather than the body of
// the dispatch lambda because pragmas cannot appear inside a macro argument.
template <typename scalar_t>
void rq_encode_cpu_blocks(const at::Tensor& x, const at::Tensor& cbf, const CodeSearch& search, int64_t C,
                          int64_t depth, int64_t* codesp, at::Tensor& quantized, bool return_cumulative,
                          at::Tensor& cumulative) {
  const int64_t N = x.size(0), D = x.size(1), K = cbf.size(-2), tn = search.rows_per_block();
  const int64_t num_blocks = (N + tn - 1) / tn;
  const float* cbp = cbf.const_data_ptr<float>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* qp = quantized.mutable_data_ptr<scalar_t>();
  scalar_t* cump = return_cumulative ? cumulative.mutable_data_ptr<scalar_t>() : nullptr;
  // Rows are independent across all depths, so a thread keeps its block's residual in
  // cache through the whole greedy search.
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor res_t = at::empty({tn, D}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor scratch = search.make_scratch();
    std::vector<float> q(tn * D), best_val(tn);
    std::vector<int64_t> best_idx(tn);
    float* res = res_t.mutable_data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * tn, rows = std::min(tn, N - n0);
      for (int64_t i = 0; i < rows * D; ++i) res[i] = static_cast<float>(xp[n0 * D + i]);
      std::fill(q.begin(), q.begin() + rows * D, 0.0f);
      for (int64_t r = 0; r < depth; ++r) {
        const int64_t c = C == 1 ? 0 : r;
        search.nearest(c, res_t.narrow(0, 0, rows), rows, scratch, best_val.data(), best_idx.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t code = best_idx[i];
          codesp[(n0 + i) * depth + r] = code;
          const float* e = cbp + (c * K + code) * D;
          float* resi = res + i * D;
          float* qi = q.data() + i * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            resi[d] -= e[d];
            qi[d] += e[d];
          }
          if (cump != nullptr) {
            scalar_t* out_row = cump + (r * N + n0 + i) * D;
            for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(qi[d]);
          }
        }
      }
      for (int64_t i = 0; i < rows * D; ++i) qp[n0 * D + i] = static_cast<scalar_t>(q[i]);
    }
  });
}

// One part (semantic or pixel) of the joint search's bookkeeping for a block of rows: its
// residual, running quantized sum, codebooks and outputs.
template <typename scalar_t>
struct JointPart {
  const scalar_t* x;      // [N, Dp] input
  const float* cb;        // [C, K, Dp] fp32 codebooks
  int64_t D;              // this part's dim
  scalar_t* quantized;    // [N, Dp] output
  scalar_t* cumulative;   // [R, N, Dp] output, or nullptr
};

// The joint greedy search over blocks of rows; see rq_joint_encode_cpu. Each depth searches
// the rows [r_sem, w r_pix] against the concatenated codes, then subtracts each part's code
// from its own residual (kept unweighted, so w never compounds over depths).
template <typename scalar_t>
void rq_joint_encode_cpu_blocks(const JointPart<scalar_t>& sem, const JointPart<scalar_t>& pix, float weight,
                                const CodeSearch& search, int64_t N, int64_t K, int64_t C, int64_t depth,
                                int64_t* codesp) {
  const int64_t tn = search.rows_per_block(), Dq = sem.D + pix.D;
  const int64_t num_blocks = (N + tn - 1) / tn;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor q_t = at::empty({tn, Dq}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor scratch = search.make_scratch();
    std::vector<float> res_sem(tn * sem.D), res_pix(tn * pix.D), q_sem(tn * sem.D), q_pix(tn * pix.D), best_val(tn);
    std::vector<int64_t> best_idx(tn);
    float* qrows = q_t.mutable_data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * tn, rows = std::min(tn, N - n0);
      for (int64_t i = 0; i < rows * sem.D; ++i) res_sem[i] = static_cast<float>(sem.x[n0 * sem.D + i]);
      for (int64_t i = 0; i < rows * pix.D; ++i) res_pix[i] = static_cast<float>(pix.x[n0 * pix.D + i]);
      std::fill(q_sem.begin(), q_sem.end(), 0.0f);
      std::fill(q_pix.begin(), q_pix.end(), 0.0f);
      for (int64_t r = 0; r < depth; ++r) {
        const int64_t c = C == 1 ? 0 : r;
        for (int64_t i = 0; i < rows; ++i) {
          float* row = qrows + i * Dq;
          std::memcpy(row, res_sem.data() + i * sem.D, sizeof(float) * sem.D);
          for (int64_t d = 0; d < pix.D; ++d) row[sem.D + d] = weight * res_pix[i * pix.D + d];
        }
        search.nearest(c, q_t.narrow(0, 0, rows), rows, scratch, best_val.data(), best_idx.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t code = best_idx[i];
          codesp[(n0 + i) * depth + r] = code;
          for (auto [part, res, q] : {std::tuple{&sem, res_sem.data(), q_sem.data()},
                                      std::tuple{&pix, res_pix.data(), q_pix.data()}}) {
            const int64_t D = part->D;
            const float* e = part->cb + (c * K + code) * D;
            float* resi = res + i * D;
            float* qi = q + i * D;
            for (int64_t d = 0; d < D; ++d) {
              resi[d] -= e[d];
              qi[d] += e[d];
            }
            if (part->cumulative != nullptr) {
              scalar_t* out_row = part->cumulative + (r * N + n0 + i) * D;
              for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(qi[d]);
            }
          }
        }
      }
      for (int64_t i = 0; i < rows * sem.D; ++i) sem.quantized[n0 * sem.D + i] = static_cast<scalar_t>(q_sem[i]);
      for (int64_t i = 0; i < rows * pix.D; ++i) pix.quantized[n0 * pix.D + i] = static_cast<scalar_t>(q_pix[i]);
    }
  });
}

at::Tensor codes_as_long_2d(const at::Tensor& codes) {
  at::Tensor c = codes.to(at::kLong).contiguous();
  return c.dim() == 1 ? c.unsqueeze(1) : c;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Argument checks (shared with the CUDA unit). Messages name the value and the fix.

int64_t check_rq_encode_args(const at::Tensor& x, const at::Tensor& codebooks, int64_t depth,
                             std::optional<at::ScalarType> codes_dtype) {
  TORCH_CHECK_VALUE(x.dim() == 2, "rq_encode: x must be 2-D [N, D], got shape ", shape_str(x),
                    "; flatten leading dims with x.reshape(-1, x.shape[-1])");
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), "rq_encode: x dtype must be float32, bfloat16 or float16, got ",
                    x.scalar_type(), "; cast it with x.float()");
  TORCH_CHECK_VALUE(is_supported_float(codebooks.scalar_type()),
                    "rq_encode: codebook dtype must be float32, bfloat16 or float16, got ", codebooks.scalar_type(),
                    "; cast it with codebook.float()");
  TORCH_CHECK_VALUE(x.is_contiguous(), "rq_encode: x must be contiguous (strides ", x.strides(),
                    "); call x.contiguous()");
  TORCH_CHECK_VALUE(codebooks.is_contiguous(), "rq_encode: codebook must be contiguous; call codebook.contiguous()");
  TORCH_CHECK_VALUE(depth >= 1, "rq_encode: depth R must be >= 1, got ", depth);
  TORCH_CHECK_VALUE(x.size(1) > 0, "rq_encode: x has dim D=0; nothing to quantize");
  TORCH_CHECK_VALUE(x.size(0) > 0, "rq_encode: empty batch (x has shape ", shape_str(x),
                    "); skip the call when there are no rows");
  TORCH_CHECK_VALUE(codebooks.dim() == 2 || codebooks.dim() == 3,
                    "rq_encode: codebook must be [K, D] (shared by all depths) or [R, K, D] (one per depth), got shape ",
                    shape_str(codebooks));
  if (codebooks.dim() == 3) {
    TORCH_CHECK_VALUE(codebooks.size(0) == depth, "rq_encode: got ", codebooks.size(0),
                      " per-depth codebooks for depth R=", depth,
                      "; pass one codebook per depth or a single [K, D] codebook shared by all depths");
  }
  TORCH_CHECK_VALUE(codebooks.size(-2) > 0, "rq_encode: codebook has no codes (shape ", shape_str(codebooks), ")");
  TORCH_CHECK_VALUE(codebooks.size(-1) == x.size(1), "rq_encode: codebook dim D=", codebooks.size(-1),
                    " does not match x dim D=", x.size(1), "; project x to the codebook dim first");
  TORCH_CHECK_VALUE(codebooks.device() == x.device(), "rq_encode: x is on ", x.device(), " but the codebook is on ",
                    codebooks.device(), "; move both to one device");
  if (codes_dtype.has_value()) {
    TORCH_CHECK_VALUE(*codes_dtype == at::kLong || *codes_dtype == at::kInt,
                      "rq_encode: codes_dtype must be torch.int64 or torch.int32, got ", *codes_dtype);
  }
  return codebooks.dim() == 2 ? 1 : depth;
}

int64_t check_rq_joint_encode_args(const at::Tensor& x_sem, const at::Tensor& x_pix, const at::Tensor& codebooks_sem,
                                   const at::Tensor& codebooks_pix, int64_t depth, double pixel_weight,
                                   std::optional<at::ScalarType> codes_dtype) {
  const int64_t C = check_rq_encode_args(x_sem, codebooks_sem, depth, codes_dtype);
  TORCH_CHECK_VALUE(check_rq_encode_args(x_pix, codebooks_pix, depth, codes_dtype) == C,
                    "rq_joint_encode: the semantic codebook ", shape_str(codebooks_sem), " and the pixel codebook ",
                    shape_str(codebooks_pix), " must both be shared by all depths or both be per depth");
  TORCH_CHECK_VALUE(x_sem.size(0) == x_pix.size(0), "rq_joint_encode: x_sem has ", x_sem.size(0),
                    " rows but x_pix has ", x_pix.size(0), "; pass the two features of the same positions");
  TORCH_CHECK_VALUE(codebooks_sem.size(-2) == codebooks_pix.size(-2), "rq_joint_encode: the semantic codebook has K=",
                    codebooks_sem.size(-2), " codes and the pixel codebook K=", codebooks_pix.size(-2),
                    "; a shared index needs the same K");
  TORCH_CHECK_VALUE(x_sem.device() == x_pix.device(), "rq_joint_encode: x_sem is on ", x_sem.device(),
                    " but x_pix on ", x_pix.device());
  TORCH_CHECK_VALUE(x_sem.scalar_type() == x_pix.scalar_type(), "rq_joint_encode: x_sem is ", x_sem.scalar_type(),
                    " but x_pix is ", x_pix.scalar_type(), "; cast both to one dtype");
  TORCH_CHECK_VALUE(pixel_weight >= 0.0, "rq_joint_encode: pixel_weight must be >= 0, got ", pixel_weight);
  return C;
}

int64_t check_code_stats_args(const char* op, const at::Tensor& x, const at::Tensor& codebooks,
                              const at::Tensor& codes) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [N, D], got shape ", shape_str(x));
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op, ": x dtype must be float32, bfloat16 or float16, got ",
                    x.scalar_type(), "; cast it with x.float()");
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous; call x.contiguous()");
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": empty batch (x has shape ", shape_str(x), "); skip the update");
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kLong || codes.scalar_type() == at::kInt, op,
                    ": codes must be int64 or int32, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 1 || codes.dim() == 2, op,
                    ": codes must be [N] (one vector per row) or [N, R] (residual codes of x), got shape ",
                    shape_str(codes));
  TORCH_CHECK_VALUE(codes.size(0) == x.size(0), op, ": codes has ", codes.size(0), " rows but x has ", x.size(0));
  const int64_t R = codes.dim() == 2 ? codes.size(1) : 1;
  TORCH_CHECK_VALUE(R >= 1, op, ": codes has depth R=0; pass at least one code per row");
  TORCH_CHECK_VALUE(codebooks.dim() == 2 || codebooks.dim() == 3, op,
                    ": codebook must be [K, D] or [R, K, D], got shape ", shape_str(codebooks));
  if (codebooks.dim() == 3) {
    TORCH_CHECK_VALUE(codebooks.size(0) == R, op, ": got ", codebooks.size(0), " per-depth codebooks but codes has depth R=",
                      R);
  }
  TORCH_CHECK_VALUE(codebooks.size(-1) == x.size(1), op, ": codebook dim D=", codebooks.size(-1),
                    " does not match x dim D=", x.size(1));
  TORCH_CHECK_VALUE(codebooks.device() == x.device() && codes.device() == x.device(), op,
                    ": x, codes and codebook must be on one device, got ", x.device(), ", ", codes.device(), ", ",
                    codebooks.device());
  const int64_t K = codebooks.size(-2);
  TORCH_CHECK_VALUE(K > 0, op, ": codebook has no codes");
  const int64_t lo = codes.min().item<int64_t>(), hi = codes.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < K, op, ": codes must lie in [0, K=", K, "), got min ", lo, " and max ", hi,
                    "; were they produced with a different codebook?");
  return R;
}

void check_ema_state_args(const char* op, const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                          const at::Tensor& codebook, double decay, double eps) {
  for (const at::Tensor* t : {&cluster_size, &embed_sum, &codebook}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat, op,
                      ": EMA state (cluster_size, embed_sum, codebook) must be float32, got ", t->scalar_type(),
                      "; keep the codebook buffers in float32");
    TORCH_CHECK_VALUE(t->is_contiguous(), op, ": EMA state must be contiguous; call .contiguous() on the buffers");
    TORCH_CHECK_VALUE(t->device() == codebook.device(), op, ": EMA state tensors must be on one device");
  }
  TORCH_CHECK_VALUE(codebook.dim() == 2 || codebook.dim() == 3, op, ": codebook must be [K, D] or [R, K, D], got shape ",
                    shape_str(codebook));
  TORCH_CHECK_VALUE(embed_sum.sizes() == codebook.sizes(), op, ": embed_sum shape ", shape_str(embed_sum),
                    " must equal the codebook shape ", shape_str(codebook));
  TORCH_CHECK_VALUE(cluster_size.sizes() == codebook.sizes().slice(0, codebook.dim() - 1), op, ": cluster_size shape ",
                    shape_str(cluster_size), " must be the codebook shape ", shape_str(codebook), " without its last dim");
  TORCH_CHECK_VALUE(decay >= 0.0 && decay < 1.0, op, ": decay must be in [0, 1), got ", decay);
  TORCH_CHECK_VALUE(eps > 0.0, op, ": eps must be > 0, got ", eps);
}

// ------------------------------------------------------------------------------------------
// CPU kernels.

std::tuple<at::Tensor, at::Tensor, at::Tensor> rq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks,
                                                             int64_t depth, bool return_cumulative,
                                                             std::optional<at::ScalarType> codes_dtype, int64_t tile_n,
                                                             int64_t tile_k) {
  const int64_t C = check_rq_encode_args(x, codebooks, depth, codes_dtype);
  const int64_t N = x.size(0), D = x.size(1);
  const at::Tensor cbf = codebooks.to(at::kFloat).contiguous();
  // Same expression as the reference so the precomputed norms match it bit for bit.
  const at::Tensor norms = (cbf * cbf).sum(-1).contiguous();
  const CodeSearch search(cbf, norms, C, N, tile_n, tile_k);

  at::Tensor codes = at::empty({N, depth}, x.options().dtype(at::kLong));
  at::Tensor quantized = at::empty_like(x);
  at::Tensor cumulative = return_cumulative ? at::empty({depth, N, D}, x.options()) : at::empty({0}, x.options());
  int64_t* codesp = codes.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rq_encode_cpu", [&] {
    rq_encode_cpu_blocks<scalar_t>(x, cbf, search, C, depth, codesp, quantized, return_cumulative, cumulative);
  });
  if (codes_dtype.has_value() && *codes_dtype == at::kInt) codes = codes.to(at::kInt);
  return {codes, quantized, cumulative};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rq_joint_encode_cpu(
    const at::Tensor& x_sem, const at::Tensor& x_pix, const at::Tensor& codebooks_sem,
    const at::Tensor& codebooks_pix, int64_t depth, double pixel_weight, bool return_cumulative,
    std::optional<at::ScalarType> codes_dtype) {
  const int64_t C = check_rq_joint_encode_args(x_sem, x_pix, codebooks_sem, codebooks_pix, depth, pixel_weight,
                                               codes_dtype);
  const int64_t N = x_sem.size(0), K = codebooks_sem.size(-2);
  const at::Tensor cb_sem = codebooks_sem.to(at::kFloat).contiguous(), cb_pix = codebooks_pix.to(at::kFloat).contiguous();
  // The reference's expressions, so codes agree bit for bit (megadual/ops/reference.py).
  const at::Tensor joint = at::cat({cb_sem, cb_pix}, -1).contiguous();
  const at::Tensor norms = ((cb_sem * cb_sem).sum(-1) + pixel_weight * (cb_pix * cb_pix).sum(-1)).contiguous();
  const CodeSearch search(joint, norms, C, N, 0, 0);

  const auto opts = x_sem.options();
  at::Tensor codes = at::empty({N, depth}, opts.dtype(at::kLong));
  at::Tensor q_sem = at::empty_like(x_sem), q_pix = at::empty_like(x_pix);
  at::Tensor cum_sem = return_cumulative ? at::empty({depth, N, x_sem.size(1)}, opts) : at::empty({0}, opts);
  at::Tensor cum_pix = return_cumulative ? at::empty({depth, N, x_pix.size(1)}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_sem.scalar_type(), "rq_joint_encode_cpu", [&] {
    const JointPart<scalar_t> sem{x_sem.const_data_ptr<scalar_t>(), cb_sem.const_data_ptr<float>(), x_sem.size(1),
                                  q_sem.mutable_data_ptr<scalar_t>(),
                                  return_cumulative ? cum_sem.mutable_data_ptr<scalar_t>() : nullptr};
    const JointPart<scalar_t> pix{x_pix.const_data_ptr<scalar_t>(), cb_pix.const_data_ptr<float>(), x_pix.size(1),
                                  q_pix.mutable_data_ptr<scalar_t>(),
                                  return_cumulative ? cum_pix.mutable_data_ptr<scalar_t>() : nullptr};
    rq_joint_encode_cpu_blocks<scalar_t>(sem, pix, static_cast<float>(pixel_weight), search, N, K, C, depth,
                                         codes.mutable_data_ptr<int64_t>());
  });
  if (codes_dtype.has_value() && *codes_dtype == at::kInt) codes = codes.to(at::kInt);
  return {codes, q_sem, q_pix, cum_sem, cum_pix};
}

std::tuple<at::Tensor, at::Tensor> rq_code_stats_cpu(const at::Tensor& x, const at::Tensor& codebooks,
                                                     const at::Tensor& codes) {
  check_code_stats_args("rq_code_stats", x, codebooks, codes);
  const int64_t C = codebooks.dim() == 2 ? 1 : codebooks.size(0);
  const at::Tensor cbf = codebooks.to(at::kFloat).contiguous();
  const at::Tensor codes64 = codes_as_long_2d(codes);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor counts = at::zeros(codebooks.sizes().slice(0, codebooks.dim() - 1), f32);
  at::Tensor sums = at::zeros(codebooks.sizes(), f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rq_code_stats_cpu", [&] {
    accumulate_code_stats_cpu<scalar_t>(x, cbf, codes64, C, counts.mutable_data_ptr<float>(),
                                        sums.mutable_data_ptr<float>());
  });
  return {counts, sums};
}

void ema_apply_cpu(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook, const at::Tensor& counts,
                   const at::Tensor& sums, double decay, double eps) {
  check_ema_state_args("ema_apply_", cluster_size, embed_sum, codebook, decay, eps);
  TORCH_CHECK_VALUE(counts.sizes() == cluster_size.sizes() && sums.sizes() == embed_sum.sizes(),
                    "ema_apply_: counts ", shape_str(counts), " / sums ", shape_str(sums),
                    " must match cluster_size ", shape_str(cluster_size), " / embed_sum ", shape_str(embed_sum));
  const at::Tensor c = counts.to(at::kFloat).contiguous(), s = sums.to(at::kFloat).contiguous();
  const int64_t C = codebook.dim() == 2 ? 1 : codebook.size(0);
  ema_apply_cpu_impl(cluster_size.mutable_data_ptr<float>(), embed_sum.mutable_data_ptr<float>(),
                     codebook.mutable_data_ptr<float>(), c.const_data_ptr<float>(), s.const_data_ptr<float>(), C,
                     codebook.size(-2), codebook.size(-1), decay, eps);
}

// Fused: count + scatter-add into one K x D scratch, then one pass over K that applies the
// EMA and the smoothed normalisation. The scratch is O(K * D); nothing O(N * K) or O(R * N * D).
void ema_update_cpu(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook, const at::Tensor& x,
                    const at::Tensor& codes, double decay, double eps) {
  check_ema_state_args("ema_update_", cluster_size, embed_sum, codebook, decay, eps);
  check_code_stats_args("ema_update_", x, codebook, codes);
  const int64_t C = codebook.dim() == 2 ? 1 : codebook.size(0);
  const int64_t K = codebook.size(-2), D = codebook.size(-1);
  const at::Tensor codes64 = codes_as_long_2d(codes);
  std::vector<float> counts(C * K, 0.0f), sums(C * K * D, 0.0f);
  // The codebook is read (residuals) before it is overwritten (normalisation) below.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ema_update_cpu", [&] {
    accumulate_code_stats_cpu<scalar_t>(x, codebook, codes64, C, counts.data(), sums.data());
  });
  ema_apply_cpu_impl(cluster_size.mutable_data_ptr<float>(), embed_sum.mutable_data_ptr<float>(),
                     codebook.mutable_data_ptr<float>(), counts.data(), sums.data(), C, K, D, decay, eps);
}

// ------------------------------------------------------------------------------------------
// Device-generic compositions of ATen ops (registered for CPU and CUDA alike).

namespace {

void ema_apply_composite(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook,
                         const at::Tensor& counts, const at::Tensor& sums, double decay, double eps) {
  check_ema_state_args("ema_apply_", cluster_size, embed_sum, codebook, decay, eps);
  TORCH_CHECK_VALUE(counts.sizes() == cluster_size.sizes() && sums.sizes() == embed_sum.sizes(),
                    "ema_apply_: counts ", shape_str(counts), " / sums ", shape_str(sums),
                    " must match cluster_size ", shape_str(cluster_size), " / embed_sum ", shape_str(embed_sum));
  const int64_t K = codebook.size(-2);
  cluster_size.mul_(decay).add_(counts, 1.0 - decay);
  embed_sum.mul_(decay).add_(sums, 1.0 - decay);
  const at::Tensor n = cluster_size.sum(-1, /*keepdim=*/true);
  const at::Tensor smoothed = (cluster_size + eps) / (n + static_cast<double>(K) * eps) * n;
  codebook.copy_(embed_sum / smoothed.unsqueeze(-1));
}

void ema_update_composite(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook, const at::Tensor& x,
                          const at::Tensor& codes, double decay, double eps) {
  check_ema_state_args("ema_update_", cluster_size, embed_sum, codebook, decay, eps);
  static auto stats_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("megadual::rq_code_stats", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&)>();
  auto [counts, sums] = stats_op.call(x, codebook, codes);
  ema_apply_composite(cluster_size, embed_sum, codebook, counts, sums, decay, eps);
}

// Dead codes (EMA count < threshold) take randomly chosen rows of `samples`: distinct rows
// (a permutation prefix) when there are enough, otherwise drawn with replacement. The draw
// is the reference's draw, call for call, so a seeded generator gives the same codebook.
at::Tensor dead_code_restart_composite(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook,
                                       const at::Tensor& samples, double threshold,
                                       std::optional<at::Generator> generator) {
  check_ema_state_args("dead_code_restart_", cluster_size, embed_sum, codebook, 0.0, 1.0);
  TORCH_CHECK_VALUE(codebook.dim() == 2, "dead_code_restart_: codebook must be [K, D], got shape ",
                    shape_str(codebook), "; call it once per depth for per-depth codebooks");
  TORCH_CHECK_VALUE(samples.dim() == 2 && samples.size(1) == codebook.size(1),
                    "dead_code_restart_: samples must be [S, D=", codebook.size(1), "], got shape ", shape_str(samples));
  TORCH_CHECK_VALUE(is_supported_float(samples.scalar_type()),
                    "dead_code_restart_: samples dtype must be float32, bfloat16 or float16, got ",
                    samples.scalar_type());
  TORCH_CHECK_VALUE(samples.size(0) > 0, "dead_code_restart_: empty batch (no samples to restart codes from)");
  TORCH_CHECK_VALUE(samples.device() == codebook.device(), "dead_code_restart_: samples are on ", samples.device(),
                    " but the codebook is on ", codebook.device());
  TORCH_CHECK_VALUE(threshold >= 0.0, "dead_code_restart_: threshold must be >= 0, got ", threshold);
  at::Tensor dead = (cluster_size < threshold).nonzero().select(1, 0);
  const int64_t M = dead.numel(), S = samples.size(0);
  if (M == 0) return dead;
  const at::Device gen_device = generator.has_value() ? generator->device() : samples.device();
  const auto idx_opts = at::TensorOptions().dtype(at::kLong).device(gen_device);
  at::Tensor rows = S >= M ? at::randperm(S, generator, idx_opts).narrow(0, 0, M) : at::randint(S, {M}, generator, idx_opts);
  const at::Tensor repl = samples.index_select(0, rows.to(samples.device())).to(at::kFloat);
  codebook.index_copy_(0, dead, repl);
  embed_sum.index_copy_(0, dead, repl * threshold);
  cluster_size.index_fill_(0, dead, threshold);
  return dead;
}

}  // namespace

}  // namespace megadual

// ------------------------------------------------------------------------------------------
// Schemas: the single declaration of each op. Fake (meta) kernels: megadual/ops/_fake.py.

TORCH_LIBRARY(megadual, m) {
  m.def(
      "rq_encode(Tensor x, Tensor codebooks, int depth, bool return_cumulative=False, "
      "ScalarType? codes_dtype=None, int tile_n=0, int tile_k=0) -> (Tensor codes, Tensor quantized, Tensor cumulative)");
  m.def(
      "rq_joint_encode(Tensor x_sem, Tensor x_pix, Tensor codebooks_sem, Tensor codebooks_pix, int depth, "
      "float pixel_weight=1.0, bool return_cumulative=False, ScalarType? codes_dtype=None) -> (Tensor codes, "
      "Tensor quantized_sem, Tensor quantized_pix, Tensor cumulative_sem, Tensor cumulative_pix)");
  m.def("rq_code_stats(Tensor x, Tensor codebooks, Tensor codes) -> (Tensor counts, Tensor sums)");
  m.def(
      "ema_apply_(Tensor(a!) cluster_size, Tensor(b!) embed_sum, Tensor(c!) codebook, Tensor counts, Tensor sums, "
      "float decay, float eps) -> ()");
  m.def(
      "ema_update_(Tensor(a!) cluster_size, Tensor(b!) embed_sum, Tensor(c!) codebook, Tensor x, Tensor codes, "
      "float decay, float eps) -> ()");
  m.def(
      "dead_code_restart_(Tensor(a!) cluster_size, Tensor(b!) embed_sum, Tensor(c!) codebook, Tensor samples, "
      "float threshold=1.0, Generator? generator=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(megadual, CPU, m) {
  m.impl("rq_encode", &megadual::rq_encode_cpu);
  m.impl("rq_joint_encode", &megadual::rq_joint_encode_cpu);
  m.impl("rq_code_stats", &megadual::rq_code_stats_cpu);
  m.impl("ema_apply_", &megadual::ema_apply_cpu);
  m.impl("ema_update_", &megadual::ema_update_cpu);
  m.impl("dead_code_restart_", &megadual::dead_code_restart_composite);
}

// rq_encode, rq_joint_encode and rq_code_stats have CUDA kernels in cuda/rq_cuda.cu (built only with CUDA).
TORCH_LIBRARY_IMPL(megadual, CUDA, m) {
  m.impl("ema_apply_", &megadual::ema_apply_composite);
  m.impl("ema_update_", &megadual::ema_update_composite);
  m.impl("dead_code_restart_", &megadual::dead_code_restart_composite);
}

// `import megadual._C` runs the registrations above. The module itself is empty: the ops are
// reached through torch.ops.megadual, so no pybind11 (and its compile time) is needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
