// CPU rANS decoder for blobs written by the encoder (layout in common/rans.h).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace kvc {

// Per-channel slot tables, lut[c][slot] = kvc_dec_entry(...): 16 KiB per channel, built
// once per call and shared by all blobs coded with those tables. `freqs` rows must sum
// to 4096 (checked by the caller).
void build_decode_tables(const uint16_t* freqs, int channels, int alphabet,
                         std::vector<uint32_t>* lut);

// Decodes one blob of `rows` x `channels` symbols into out[rows][channels]. The blob is
// untrusted: any inconsistency returns a message (and `out` holds garbage); it never
// reads outside [blob, blob + size) and always terminates after rows * channels steps.
std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const uint32_t* lut, uint8_t* out);

}  // namespace kvc
