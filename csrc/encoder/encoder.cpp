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

std::string encode_blob(const uint8_t* symbols, int rows, int channels, int first_row,
                        const uint16_t* freqs, const uint32_t* cums, int alphabet,
                        std::vector<uint16_t>* words, std::vector<uint8_t>* out) {
  uint32_t state[KVC_LANES];
  for (uint32_t& x : state) x = KVC_RANS_L;
  words->clear();
  const int groups = (channels + KVC_LANES - 1) / KVC_LANES;
  // rANS is LIFO: walk the decode order backwards (tokens, groups, lanes all descending).
  for (int t = rows - 1; t >= 0; --t) {
    const uint8_t* row = symbols + (size_t)t * channels;
    for (int g = groups - 1; g >= 0; --g) {
      const int first = g * KVC_LANES;
      for (int c = std::min(channels, first + KVC_LANES) - 1; c >= first; --c) {
        const uint32_t s = row[c];
        const size_t k = (size_t)c * alphabet + s;
        const uint32_t f = s < (uint32_t)alphabet ? freqs[k] : 0;
        if (f == 0) {
          return "symbol " + std::to_string(s) + " at token " + std::to_string(first_row + t) +
                 ", channel " + std::to_string(c) + " has zero frequency in its table";
        }
        uint16_t w;
        if (kvc_enc_step(&state[c - first], f, cums[k], &w)) words->push_back(w);
      }
    }
  }
  out->resize(KVC_STATE_BYTES + 2 * words->size());
  uint8_t* p = out->data();
  for (uint32_t x : state) {
    for (int b = 0; b < 4; ++b) *p++ = (uint8_t)(x >> (8 * b));
  }
  for (size_t i = words->size(); i-- > 0;) {  // the decoder reads them forwards
    *p++ = (uint8_t)((*words)[i] & 0xff);
    *p++ = (uint8_t)((*words)[i] >> 8);
  }
  return std::string();
}

}  // namespace kvc
