// CPU rANS encoder: one blob per chunk of rows, lanes interleaved as in common/rans.h.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

namespace kvc {

// Encodes rows [0, rows) of the row-major symbol matrix `symbols` ([rows][channels]) into
// `out` (replaced). `freqs`/`cums` are [channels][alphabet]. Returns an empty string on
// success, else a message naming the offending token and channel.
std::string encode_blob(const uint8_t* symbols, int rows, int channels, const uint16_t* freqs,
                        const uint32_t* cums, int alphabet, std::vector<uint8_t>* out);

// Exclusive prefix sums of each channel's table: cums[c][s] = sum freqs[c][0..s).
void cumulative(const uint16_t* freqs, int channels, int alphabet, uint32_t* cums);

}  // namespace kvc
