// CPU rANS decoder for blobs written by the encoder (layout in common/rans.h).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace kvc {

// Per-channel decode tables, built once per stream and reused for all its blobs:
// slot -> symbol (one byte per slot, 4 KiB per channel, so a 193-channel stream stays
// in L2) and symbol -> freq | cum << 16.
struct DecodeTables {
  std::vector<uint8_t> symbol;  // [channels][PROB_SCALE]
  std::vector<uint32_t> range;  // [channels][MAX_ALPHABET]
};

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out);

// Decodes one blob of `rows` x `channels` symbols into `out` (row-major). The blob is
// untrusted: on any inconsistency it returns a message and `out` holds garbage; it never
// reads outside [blob, blob + size).
std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const DecodeTables& tables, uint8_t* out);

}  // namespace kvc
