// Shapes: N rows, D dim, K codes, W SIMD lanes, MR rows x NR codes per register tile.
//
// The fused nearest-code search of the CPU rq_encode at small D: dot products are computed in
// registers and folded into a running (min, argmin) per row at once, so no distance or dot
// tile is ever written to memory. Plain C++ and GCC vector extensions only (no ATen): this
// unit compiles in a few seconds. See rq.h for the contract.
//
// Arithmetic (the "distance order", kept bit-identical to megadual/ops/reference.py):
//   dot(x, e) = fma(x[D-1], e[D-1], ... fma(x[1], e[1], fma(x[0], e[0], 0)))  in fp32,
//               i.e. one fused multiply-add per component, in increasing d;
//   dist      = ||e||^2 - 2 * dot   (2 * dot is exact: one rounding, the subtraction),
// with ||e||^2 precomputed by the caller. This is exactly what MKL's sgemm computes for the
// reference's `norm - 2 * (residual @ cb.T)` at these D (verified: bit-equal dots), so codes
// agree even at fp32 near-ties. Ties go to the lowest index (see search_tile).
//
// Vectorisation: one kernel template over GCC vector types (W lanes of fp32), compiled into an
// AVX-512 and an AVX2+FMA entry point with __attribute__((target)) and chosen at run time
// (__builtin_cpu_supports): the wheel runs on any x86-64. Without FMA hardware (or off x86 /
// GCC) there is no fused path and rq_encode keeps its GEMM-tiled one, so the dot products
// are never computed with a different rounding than the reference's.

#include "rq.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace megadual {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MEGADUAL_HAVE_FUSED 1
#else
#define MEGADUAL_HAVE_FUSED 0
#endif

namespace {

#if MEGADUAL_HAVE_FUSED

template <int W>
struct Lanes {
  typedef float f __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t i __attribute__((vector_size(W * sizeof(int32_t))));
};

// Register tiles: MR rows x NV vectors of W codes (NR = NV * W codes per panel).
// AVX-512 (32 zmm): 8 x 2 -> 16 accumulators + 8 running minima (+ 8 argmins, partly spilled).
// AVX2 (16 ymm): 3 x 2 -> 6 accumulators + 6 running minima; the argmins spill to L1.
constexpr int kMR512 = 8, kNV512 = 2, kW512 = 16;
constexpr int kMR256 = 3, kNV256 = 2, kW256 = 8;

template <typename V>
inline __attribute__((always_inline)) void load(V& v, const float* p) {
  std::memcpy(&v, p, sizeof(V));
}

// One MR-row tile against panels [p0, p1): dots in registers, one fma per component in
// increasing d, then dist = norm - 2 * dot folded into the per-lane running minimum.
// Lane j of vector h of panel p holds code p*NR + h*W + j, so each lane sees its codes in
// increasing order and a strict < keeps the lowest index among equal distances; lanes are
// merged by (value, index) at the end (finish_rows).
// D_FIXED > 0 makes the d loop a compile-time count (fully unrolled); 0 reads D at run time.
template <int W, int MR, int NV, int D_FIXED>
inline __attribute__((always_inline)) void search_tile(const float* __restrict x, int64_t D_runtime,
                                                       const float* __restrict packed,
                                                       const float* __restrict pnorms, int64_t p0, int64_t p1,
                                                       float* __restrict sval, int32_t* __restrict sidx) {
  using vf = typename Lanes<W>::f;
  using vi = typename Lanes<W>::i;
  constexpr int NR = NV * W;
  const int64_t D = D_FIXED > 0 ? D_FIXED : D_runtime;
  vi iota;
  for (int j = 0; j < W; ++j) iota[j] = j;
  vf bv[MR];
  vi bi[MR];
  for (int i = 0; i < MR; ++i) {
    load(bv[i], sval + i * W);
    std::memcpy(&bi[i], sidx + i * W, sizeof(vi));
  }
  vi base = iota + static_cast<int32_t>(p0 * NR);
  for (int64_t p = p0; p < p1; ++p) {
    const float* pp = packed + p * D * NR;
    vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < NV; ++h) acc[i][h] = vf{};
#pragma GCC unroll 8
    for (int64_t d = 0; d < D; ++d) {
      vf e[NV];
      for (int h = 0; h < NV; ++h) load(e[h], pp + d * NR + h * W);
      for (int i = 0; i < MR; ++i) {
        const float xs = x[i * D + d];
        // One rounding per step: contracted to an FMA (the targets below all have it;
        // C++ mode GCC defaults to -ffp-contract=fast and setup.py does not change it).
        for (int h = 0; h < NV; ++h) acc[i][h] = xs * e[h] + acc[i][h];
      }
    }
    for (int h = 0; h < NV; ++h) {
      vf nrm;
      load(nrm, pnorms + p * NR + h * W);
      const vi at = base + h * W;
      for (int i = 0; i < MR; ++i) {
        const vf v = nrm - 2.0f * acc[i][h];
        const vi better = v < bv[i];
        bv[i] = better ? v : bv[i];
        bi[i] = better ? at : bi[i];
      }
    }
    base += NR;
  }
  for (int i = 0; i < MR; ++i) {
    std::memcpy(sval + i * W, &bv[i], sizeof(vf));
    std::memcpy(sidx + i * W, &bi[i], sizeof(vi));
  }
}

// The search for `rows` rows of x (fp32, [rows, D]) against a packed codebook. Rows go in
// tiles of MR (a zero-padded copy for the tail); codes go in blocks of `block_panels` panels
// (kept in L2 while every row tile of the call passes over them).
template <int W, int MR, int NV, int D_FIXED>
inline __attribute__((always_inline)) void search_rows(const float* x, int64_t rows, int64_t D,
                                                       const float* packed, const float* pnorms,
                                                       int64_t num_panels, int64_t block_panels, float* sval,
                                                       int32_t* sidx) {
  float tail[MR * kFusedMaxD];
  const int64_t full = rows / MR * MR;
  if (full < rows) {
    std::memset(tail, 0, sizeof(float) * MR * D);
    std::memcpy(tail, x + full * D, sizeof(float) * (rows - full) * D);
  }
  for (int64_t p0 = 0; p0 < num_panels; p0 += block_panels) {
    const int64_t p1 = std::min(num_panels, p0 + block_panels);
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
      const float* xt = i0 < full ? x + i0 * D : tail;
      search_tile<W, MR, NV, D_FIXED>(xt, D, packed, pnorms, p0, p1, sval + i0 * W, sidx + i0 * W);
    }
  }
}

template <int W, int MR, int NV>
inline __attribute__((always_inline)) void search_rows_any_d(const float* x, int64_t rows, int64_t D,
                                                             const float* packed, const float* pnorms,
                                                             int64_t num_panels, int64_t block_panels, float* sval,
                                                             int32_t* sidx) {
  // The common small dims get a fully unrolled d loop; anything else loops at run time.
  switch (D) {
    case 16:
      return search_rows<W, MR, NV, 16>(x, rows, D, packed, pnorms, num_panels, block_panels, sval, sidx);
    case 32:
      return search_rows<W, MR, NV, 32>(x, rows, D, packed, pnorms, num_panels, block_panels, sval, sidx);
    case 64:
      return search_rows<W, MR, NV, 64>(x, rows, D, packed, pnorms, num_panels, block_panels, sval, sidx);
    default:
      return search_rows<W, MR, NV, 0>(x, rows, D, packed, pnorms, num_panels, block_panels, sval, sidx);
  }
}

__attribute__((target("avx512f"), flatten)) void search_rows_avx512(const float* x, int64_t rows, int64_t D,
                                                                      const float* packed, const float* pnorms,
                                                                      int64_t num_panels, int64_t block_panels,
                                                                      float* sval, int32_t* sidx) {
  search_rows_any_d<kW512, kMR512, kNV512>(x, rows, D, packed, pnorms, num_panels, block_panels, sval, sidx);
}

__attribute__((target("avx2,fma"), flatten)) void search_rows_avx2(const float* x, int64_t rows, int64_t D,
                                                                     const float* packed, const float* pnorms,
                                                                     int64_t num_panels, int64_t block_panels,
                                                                     float* sval, int32_t* sidx) {
  search_rows_any_d<kW256, kMR256, kNV256>(x, rows, D, packed, pnorms, num_panels, block_panels, sval, sidx);
}

#endif  // MEGADUAL_HAVE_FUSED

int lanes_of(FusedIsa isa) { return isa == FusedIsa::kAvx512 ? 16 : 8; }

}  // namespace

FusedIsa fused_isa_supported() {
#if MEGADUAL_HAVE_FUSED
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return FusedIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return FusedIsa::kAvx2;
#endif
  return FusedIsa::kNone;
}

int64_t fused_panel_codes(FusedIsa isa) {
#if MEGADUAL_HAVE_FUSED
  return isa == FusedIsa::kAvx512 ? kNV512 * kW512 : kNV256 * kW256;
#else
  (void)isa;
  return 1;
#endif
}

int64_t fused_state_lanes(FusedIsa isa) { return lanes_of(isa); }

void fused_pack_codebook(FusedIsa isa, const float* cb, const float* norms, int64_t K, int64_t D, float* packed,
                         float* packed_norms) {
  const int64_t NR = fused_panel_codes(isa);
  const int64_t P = (K + NR - 1) / NR;
  for (int64_t p = 0; p < P; ++p) {
    float* pp = packed + p * D * NR;
    for (int64_t c = 0; c < NR; ++c) {
      const int64_t k = p * NR + c;
      // Padding codes: zero vectors at distance +inf, never strictly nearer than anything.
      packed_norms[k] = k < K ? norms[k] : std::numeric_limits<float>::infinity();
      for (int64_t d = 0; d < D; ++d) pp[d * NR + c] = k < K ? cb[k * D + d] : 0.0f;
    }
  }
}

void fused_nearest_codes(FusedIsa isa, const float* x, int64_t rows, int64_t D, const float* packed,
                         const float* packed_norms, int64_t K, int64_t block_codes, int64_t* out_idx) {
  TORCH_CHECK(D <= kFusedMaxD, "fused_nearest_codes: D=", D, " > ", kFusedMaxD);
  const int64_t W = lanes_of(isa), NR = fused_panel_codes(isa);
  const int64_t num_panels = (K + NR - 1) / NR;
  const int64_t block_panels = std::max<int64_t>(1, (block_codes + NR - 1) / NR);
  // Running per-lane (min, argmin) of every row, rounded up to whole row tiles.
  const int64_t rows_pad = rows + 8;
  std::vector<float> sval(rows_pad * W, std::numeric_limits<float>::infinity());
  std::vector<int32_t> sidx(rows_pad * W, 0);
#if MEGADUAL_HAVE_FUSED
  if (isa == FusedIsa::kAvx512) {
    search_rows_avx512(x, rows, D, packed, packed_norms, num_panels, block_panels, sval.data(), sidx.data());
  } else {
    search_rows_avx2(x, rows, D, packed, packed_norms, num_panels, block_panels, sval.data(), sidx.data());
  }
#else
  TORCH_CHECK(false, "fused_nearest_codes: no fused kernel in this build");
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const float* v = sval.data() + i * W;
    const int32_t* ix = sidx.data() + i * W;
    float best = v[0];
    int32_t arg = ix[0];
    for (int64_t j = 1; j < W; ++j) {
      if (v[j] < best || (v[j] == best && ix[j] < arg)) {
        best = v[j];
        arg = ix[j];
      }
    }
    out_idx[i] = arg;
  }
}

}  // namespace megadual
