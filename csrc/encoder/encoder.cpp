#include "encoder.h"

#include <algorithm>

#include "../common/rans.h"

namespace kvc {

void cumulative(const uint16_t* freqs, int channels, int alphabet, uint32_t* cums) {
  for (int c = 0; c < channels; ++c) {
    uint32_t acc = 0;
    for (int s = 0; s < alphabet; ++s) {
      cums[(size_t)c * alphabet + s] = acc;
      acc += freqs[(size_t)c * alphabet + s];
    }
  }
}

std::string encode_blob(const uint8_t* symbols, int rows, int channels, const uint16_t* freqs,
                        const uint32_t* cums, int alphabet, std::vector<uint8_t>* out) {
  uint32_t state[LANES];
  for (int j = 0; j < LANES; ++j) state[j] = RANS_L;
  std::vector<uint16_t> words;
  words.reserve((size_t)rows * channels / 2 + 16);
  const int groups = (channels + LANES - 1) / LANES;
  // Reverse of the decode order: tokens, groups and lanes all descending.
  for (int t = rows - 1; t >= 0; --t) {
    const uint8_t* row = symbols + (size_t)t * channels;
    for (int g = groups - 1; g >= 0; --g) {
      const int first = g * LANES;
      const int last = std::min(channels, first + LANES) - 1;
      for (int c = last; c >= first; --c) {
        const uint32_t s = row[c];
        const size_t k = (size_t)c * alphabet + s;
        const uint32_t f = s < (uint32_t)alphabet ? freqs[k] : 0;
        if (f == 0) {
          return "symbol " + std::to_string(s) + " at token " + std::to_string(t) + ", channel " +
                 std::to_string(c) + " has zero frequency in its table";
        }
        uint32_t* x = &state[c - first];
        uint16_t w;
        if (enc_renorm(x, f, &w)) words.push_back(w);
        enc_put(x, f, cums[k]);
      }
    }
  }
  out->resize(STATE_BYTES + 2 * words.size());
  uint8_t* p = out->data();
  for (int j = 0; j < LANES; ++j) {
    for (int b = 0; b < 4; ++b) *p++ = (uint8_t)(state[j] >> (8 * b));
  }
  for (size_t i = words.size(); i-- > 0;) {
    *p++ = (uint8_t)(words[i] & 0xff);
    *p++ = (uint8_t)(words[i] >> 8);
  }
  return std::string();
}

}  // namespace kvc
