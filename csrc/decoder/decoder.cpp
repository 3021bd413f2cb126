#include "decoder.h"

#include <string.h>

#include <algorithm>

#include "../common/rans.h"

namespace kvc {

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out) {
  constexpr int B = DecodeTables::BUCKETS, SHIFT = PROB_BITS - DecodeTables::BUCKET_BITS;
  int lo = alphabet, hi = -1;  // the span any channel uses
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet;
    int a = 0, b = alphabet - 1;
    while (a < lo && f[a] == 0) ++a;
    while (b > hi && f[b] == 0) --b;
    lo = std::min(lo, a);
    hi = std::max(hi, b);
  }
  if (hi < lo) lo = hi = 0;  // all-zero tables (rejected upstream): one symbol, never matched
  out->base = lo;
  const int width = hi - lo + 1;
  out->stride = width + 1;
  out->bucket.assign((size_t)channels * B, 0);
  out->range.assign((size_t)channels * out->stride, 0);
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet + lo;
    uint8_t* bucket = out->bucket.data() + (size_t)c * B;
    uint32_t* range = out->range.data() + (size_t)c * out->stride;
    uint32_t cum = 0;
    for (int s = 0; s < width; ++s) {
      // Tables are validated to sum to PROB_SCALE; clamp defensively anyway.
      const uint32_t fs = std::min<uint32_t>(f[s], PROB_SCALE - cum);
      range[s] = fs | (cum << 16);
      // Buckets whose first slot falls in [cum, cum + fs) start at this symbol.
      for (uint32_t b = (cum + (1u << SHIFT) - 1) >> SHIFT; b < (uint32_t)B && (b << SHIFT) < cum + fs; ++b)
        bucket[b] = (uint8_t)s;
      cum += fs;
    }
    range[width] = PROB_SCALE << 16;  // sentinel: no slot lies at or past it
  }
}

static inline uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const DecodeTables& tables, uint8_t* out) {
  if (size < (size_t)STATE_BYTES) return "blob shorter than its lane states";
  if ((size - STATE_BYTES) % 2) return "blob has an odd number of word bytes";
  uint32_t state[LANES];
  for (int j = 0; j < LANES; ++j) {
    state[j] = load_u32(blob + 4 * j);
    const bool used = j < channels;
    if (used ? state[j] < RANS_L : state[j] != RANS_L) return "invalid initial lane state";
  }
  const uint8_t* words = blob + STATE_BYTES;
  const size_t n_words = (size - STATE_BYTES) / 2;
  size_t pos = 0;
  const int groups = (channels + LANES - 1) / LANES;
  const size_t stride = (size_t)tables.stride;
  const uint32_t base = (uint32_t)tables.base;
  constexpr int shift = PROB_BITS - DecodeTables::BUCKET_BITS;
  for (int t = 0; t < rows; ++t) {
    uint8_t* row = out + (size_t)t * channels;
    for (int g = 0; g < groups; ++g) {
      const int first = g * LANES;
      const int n = std::min(channels - first, LANES);
      const uint8_t* gbucket = tables.bucket.data() + (size_t)first * DecodeTables::BUCKETS;
      const uint32_t* grange = tables.range.data() + (size_t)first * stride;
      // Two passes: the lanes' table lookups are independent and overlap; only the
      // refills are ordered (they share one word stream).
      for (int j = 0; j < n; ++j) {
        uint32_t x = state[j];
        const uint32_t slot = x & PROB_MASK;
        const uint32_t* range = grange + (size_t)j * stride;
        uint32_t s = gbucket[(size_t)j * DecodeTables::BUCKETS + (slot >> shift)];
        while (slot >= (range[s + 1] >> 16)) ++s;  // the sentinel stops it at the last symbol
        const uint32_t r = range[s];
        dec_advance(&x, r & 0xffff, r >> 16);
        row[first + j] = (uint8_t)(s + base);
        state[j] = x;
      }
      for (int j = 0; j < n; ++j) {
        if (dec_needs_word(state[j])) {
          if (pos >= n_words) return "truncated word stream";
          state[j] = dec_refill(state[j], (uint16_t)(words[2 * pos] | (words[2 * pos + 1] << 8)));
          ++pos;
        }
      }
    }
  }
  for (int j = 0; j < std::min(channels, LANES); ++j) {
    if (state[j] != RANS_L) return "corrupt blob (final lane state mismatch)";
  }
  if (pos != n_words) return "corrupt blob (unread words at the end)";
  return std::string();
}

}  // namespace kvc
