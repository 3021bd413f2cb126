// Symbols -> float32 cache layout for the per-token-step uniform quantizer, fused with
// RoPE re-application, so a decoded stream goes from bytes to the [heads, tokens,
// head_dim] tensor attention reads in one pass that stays in cache.
#pragma once
#include <stdint.h>

#include <string>

namespace kvc {

struct DequantSpec {
  const float* grid;     // [256]: step of each per-token step code (codec.quant.STEP_GRID)
  const float* mult;     // [channels]: per-channel step multiplier (head_scale)
  int half_range;        // R: symbol s means (s - R) * step
  int heads, head_dim;   // channels = heads * head_dim
  const float* cos;      // [rows, head_dim] or null: re-apply rotate_half RoPE
  const float* sin;
  float* out;            // [heads, rows, head_dim]; tokens and channels contiguous
  size_t head_stride;    // floats from one head to the next in `out` (>= rows * head_dim),
                         // so a decode can land in a slice of a larger cache buffer
};

// `symbols` is [rows, channels + 1] (the last column is the step code). Matches the
// PyTorch path bit for bit: ((s - R) * (grid[code] * mult[c])), then
// x * cos + rotate_half(x) * sin, each product rounded separately (no FMA contraction).
// Returns an error for a symbol above 2R (data inconsistent with the header).
std::string dequant_token(const uint8_t* symbols, int rows, const DequantSpec& spec);

}  // namespace kvc
