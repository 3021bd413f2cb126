// CPU rANS decoder for blobs written by the encoder (layout in common/rans.h).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>

namespace kvc {

// Per-channel slot lookup tables: lut[c][slot] for slot in [0, PROB_SCALE).
void build_luts(const uint16_t* freqs, int channels, int alphabet, uint32_t* lut);

// Decodes one blob of `rows` x `channels` symbols into `out` (row-major). The blob is
// untrusted: on any inconsistency it returns a message and `out` holds garbage; it never
// reads outside [blob, blob + size).
std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const uint32_t* lut, uint8_t* out);

}  // namespace kvc
