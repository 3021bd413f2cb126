// Symbols -> float32 cache layout for the per-token-step uniform quantizer, fused with
// RoPE re-application, so a decoded stream goes from bytes to the [heads, tokens,
// head_dim] tensor attention reads in one pass that stays in cache.
#pragma once
#include <stdint.h>

#include <string>

namespace kvc {

struct DequantSpec {
  const float* grid;     // [256]: step of each per-token step code (codec.quant.STEP_GRID)
  const float* mult;     // [channels]: per-channel step multiplier (head_scale, fitted scale)
  const float* add;      // [channels] or null: per-channel offset added after the step
                         // (the fitted mean of a centered stream), before RoPE; with
                         // add_rows, one such row per add_rows rows (files decoded as one
                         // stream, each centered on its own mean)
  int add_rows;          // 0: one row of offsets for every row
  int half_range;        // R: symbol s means (s - R) * step
  int heads, head_dim;   // channels = heads * head_dim
  const float* cos;      // [rows, head_dim] or null: re-apply rotate_half RoPE
  const float* sin;
  float* out;            // [heads, rows, head_dim]; tokens and channels contiguous
  size_t head_stride;    // floats from one head to the next in `out` (>= rows * head_dim),
                         // so a decode can land in a slice of a larger cache buffer
  const float* basis;    // [heads, head_dim, head_dim] or null: a klt stream's inverse
                         // transform; row j of head k is component j's contribution to the
                         // head's channels, applied before `add` and RoPE
};

// `symbols` is [rows, channels + 1] (the last column is the step code). Matches the
// PyTorch path bit for bit: ((s - R) * (grid[code] * mult[c])) (+ add[c] if given), then
// x * cos + rotate_half(x) * sin, each product rounded separately (no FMA contraction).
// With `basis`, x is first replaced by y = sum_j x[j] * basis[k][j] over the nonzero x[j]
// in ascending j, alternately into two sums from +0 (the 1st, 3rd, ... term into one, the
// 2nd, 4th, ... into the other), each term a fused multiply-add (correctly rounded, so
// std::fmaf, the AVX2/AVX-512 FMA instructions and CUDA's __fmaf_rn agree), then the two
// sums added: every path sums in this order, so all are bit-identical.
// `symbols` holds rows [row0, row0 + rows) of the stream, which land at those rows of
// `out` and take those rows of cos/sin. Returns an error for a symbol above 2R (data
// inconsistent with the header). Runs the AVX2 variant (dequant_avx2.cpp, bit-identical:
// the same IEEE operations in the same order) where the decoder runs its AVX2 path.
std::string dequant_token(const uint8_t* symbols, int rows, const DequantSpec& spec,
                          int row0 = 0);

// The two variants behind it; the AVX2 one handles head_dim % 16 == 0 (false otherwise,
// or where it is not built) and sets *bad_row to the first row with a bad symbol, or -1.
void dequant_token_scalar(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                          int* bad_row);
bool dequant_token_avx2(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                        int* bad_row);

// The inverse transform of one head (basis.cpp), AVX2+FMA or AVX-512: out = sum_j x[j] *
// basis[j], as the scalar variant sums it (head_dim % 16 == 0; x and out: head_dim floats).
// basis_simd_ok: whether this CPU has the FMA instructions it needs (else the scalar path).
void basis_simd(const float* x, const float* basis, int head_dim, float* out, bool avx512);
bool basis_simd_ok();

}  // namespace kvc
