// CPU rANS encoder: one blob per chunk of rows, lanes interleaved as in common/rans.h.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

namespace kvc {

// Exclusive prefix sums of each channel's table: cums[c][s] = sum freqs[c][0..s).
void cumulative(const uint16_t* freqs, int channels, int alphabet, uint32_t* cums);

// Encodes the row-major matrix symbols[rows][channels] into `out` (replaced). `first_row`
// only labels error messages. `words` is scratch reused across calls. Returns "" on
// success, else a message naming the token and channel of a symbol with zero frequency.
std::string encode_blob(const uint8_t* symbols, int rows, int channels, int first_row,
                        const uint16_t* freqs, const uint32_t* cums, int alphabet,
                        std::vector<uint16_t>* words, std::vector<uint8_t>* out);

}  // namespace kvc
