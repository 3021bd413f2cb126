#include "decoder.h"

#include <algorithm>

#include "../common/rans.h"

namespace kvc {

void build_luts(const uint16_t* freqs, int channels, int alphabet, uint32_t* lut) {
  for (int c = 0; c < channels; ++c) {
    uint32_t* row = lut + (size_t)c * PROB_SCALE;
    uint32_t slot = 0;
    for (int s = 0; s < alphabet; ++s) {
      const uint32_t f = freqs[(size_t)c * alphabet + s];
      for (uint32_t i = 0; i < f && slot < PROB_SCALE; ++i, ++slot) row[slot] = lut_pack(s, f, i);
    }
    // Tables are validated to sum to PROB_SCALE; fill defensively anyway.
    for (; slot < PROB_SCALE; ++slot) row[slot] = lut_pack(0, 1, 0);
  }
}

static inline uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const uint32_t* lut, uint8_t* out) {
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
  for (int t = 0; t < rows; ++t) {
    uint8_t* row = out + (size_t)t * channels;
    for (int g = 0; g < groups; ++g) {
      const int first = g * LANES;
      const int n = std::min(channels - first, LANES);
      const uint32_t* glut = lut + (size_t)first * PROB_SCALE;
      for (int j = 0; j < n; ++j) {
        uint32_t x = state[j];
        const uint32_t e = glut[(size_t)j * PROB_SCALE + (x & PROB_MASK)];
        row[first + j] = (uint8_t)dec_advance(&x, e);
        if (dec_needs_word(x)) {
          if (pos >= n_words) return "truncated word stream";
          x = dec_refill(x, (uint16_t)(words[2 * pos] | (words[2 * pos + 1] << 8)));
          ++pos;
        }
        state[j] = x;
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
