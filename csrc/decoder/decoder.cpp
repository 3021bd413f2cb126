#include "decoder.h"

#include <algorithm>

#include "../common/rans.h"

namespace kvc {

void build_decode_tables(const uint16_t* freqs, int channels, int alphabet,
                         std::vector<uint32_t>* lut) {
  lut->resize((size_t)channels * KVC_PROB_SCALE);
  for (int c = 0; c < channels; ++c) {
    uint32_t* t = lut->data() + (size_t)c * KVC_PROB_SCALE;
    uint32_t cum = 0;
    for (int s = 0; s < alphabet; ++s) {
      const uint32_t f = freqs[(size_t)c * alphabet + s];
      for (uint32_t k = 0; k < f; ++k) t[cum + k] = kvc_dec_entry(s, f, k);
      cum += f;
    }
  }
}

static inline uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint16_t load_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

// One step (t, g) over lanes [0, n). Two passes: the table lookups of the lanes are
// independent and overlap in the pipeline; only the refills are serial (they share the
// word cursor), and those are branch-free. `checked` guards reads near the stream end.
template <bool checked>
static inline bool decode_step(uint32_t* state, int n, const uint32_t* glut, uint8_t* row,
                               const uint8_t* words, size_t n_words, size_t* pos_io) {
  for (int j = 0; j < n; ++j) {
    const uint32_t x = state[j];
    const uint32_t e = glut[(size_t)j * KVC_PROB_SCALE + kvc_dec_slot(x)];
    row[j] = (uint8_t)kvc_dec_symbol(e);
    state[j] = kvc_dec_advance(x, e);
  }
  size_t pos = *pos_io;
  for (int j = 0; j < n; ++j) {
    const bool need = kvc_dec_needs_word(state[j]);
    if (checked && need && pos >= n_words) return false;
    // Unchecked: the caller guarantees n words remain. Checked: never touch the end.
    const uint16_t w = (!checked || pos < n_words) ? load_u16(words + 2 * pos) : 0;
    state[j] = need ? kvc_dec_refill(state[j], w) : state[j];
    pos += need;
  }
  *pos_io = pos;
  return true;
}

std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const uint32_t* lut, uint8_t* out) {
  if (size < (size_t)KVC_STATE_BYTES) return "blob shorter than its 128 bytes of lane states";
  if (size % 2) return "blob has an odd length";
  uint32_t state[KVC_LANES];
  for (int j = 0; j < KVC_LANES; ++j) {
    state[j] = load_u32(blob + 4 * j);
    const bool used = j < channels;
    if (used ? state[j] < KVC_RANS_L : state[j] != KVC_RANS_L) {
      return "invalid initial state of lane " + std::to_string(j);
    }
  }
  const uint8_t* words = blob + KVC_STATE_BYTES;
  const size_t n_words = (size - KVC_STATE_BYTES) / 2;
  size_t pos = 0;
  const int groups = (channels + KVC_LANES - 1) / KVC_LANES;
  for (int t = 0; t < rows; ++t) {
    uint8_t* row = out + (size_t)t * channels;
    for (int g = 0; g < groups; ++g) {
      const int first = g * KVC_LANES;
      const int n = std::min(channels - first, KVC_LANES);
      const uint32_t* glut = lut + (size_t)first * KVC_PROB_SCALE;
      // A step reads at most n words, so with that many left no read needs a check.
      if (n_words - pos >= (size_t)n) {
        if (n == KVC_LANES) {
          decode_step<false>(state, KVC_LANES, glut, row + first, words, n_words, &pos);
        } else {
          decode_step<false>(state, n, glut, row + first, words, n_words, &pos);
        }
      } else if (!decode_step<true>(state, n, glut, row + first, words, n_words, &pos)) {
        return "truncated word stream";
      }
    }
  }
  for (int j = 0; j < std::min(channels, KVC_LANES); ++j) {
    if (state[j] != KVC_RANS_L) return "corrupt blob (final state of lane " + std::to_string(j) + " is not L)";
  }
  if (pos != n_words) return "corrupt blob (" + std::to_string(n_words - pos) + " unread words)";
  return std::string();
}

}  // namespace kvc
