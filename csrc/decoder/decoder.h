// CPU rANS decoder for blobs written by the encoder (layout in common/rans.h).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace kvc {

// Per-channel decode tables, built once per stream and reused for all its blobs. Compact,
// so that the tables of all of a file's streams stay in the last-level cache when a file
// is decoded chunk by chunk (a flat slot -> symbol map would be 4 KiB per channel, ~1 MB
// per stream and ~60 MB per file, and each chunk would refetch it from memory). They
// cover only the symbols [base, base + stride - 1) that some channel of the stream uses:
//   range  [channels][stride]: freq | cum << 16 per symbol, then a sentinel cum = 2^12;
//   bucket [channels][BUCKETS]: the symbol (less base) that holds slot b * (2^12 / BUCKETS).
// A slot's symbol is its bucket's symbol, stepped forward while the slot lies at or past
// the next symbol's cum (rarely more than one step: only buckets that straddle a symbol
// boundary need any). About 0.25 KiB per channel for the shipped quantizers, whose 256-symbol
// alphabets use a span of 20-40 symbols per stream.
struct DecodeTables {
  static constexpr int BUCKET_BITS = 7;
  static constexpr int BUCKETS = 1 << BUCKET_BITS;
  int base = 0;                 // the first symbol covered
  int stride = 0;               // symbols covered + 1
  std::vector<uint8_t> bucket;  // [channels][BUCKETS]
  std::vector<uint32_t> range;  // [channels][stride]
};

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out);

// Decodes one blob of `rows` x `channels` symbols into `out` (row-major). The blob is
// untrusted: on any inconsistency it returns a message and `out` holds garbage; it never
// reads outside [blob, blob + size).
// Runs the AVX2 path where the CPU has it (decode_avx2.cpp; bit-identical), else scalar.
std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const DecodeTables& tables, uint8_t* out);

// The decode path in use ("avx2" or "scalar"), and a switch for tests and benchmarks:
// "scalar", "avx2" (false if the CPU lacks it) or "auto". KVCODEC_SIMD=scalar in the
// environment starts on the scalar path.
const char* simd_path();
bool set_simd_path(const std::string& name);

}  // namespace kvc
