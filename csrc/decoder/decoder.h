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
//   bucket [channels][BUCKETS]: for the 2^12 / BUCKETS slots from b * 2^12 / BUCKETS,
//     s0 | split << 8 | multi << 15: s0 (less base) holds the bucket's first slot, s0 + 1
//     starts at slot `split` of the bucket (32: not in it), and multi is set when s0 + 1
//     does not hold every slot of the bucket from there on.
// A slot's symbol is s0, plus one if the slot lies at or past the split; in a `multi`
// bucket it is then stepped forward while the slot lies at or past the next symbol's
// cum. About 0.4 KiB per channel for the shipped quantizers, whose 256-symbol alphabets
// use a span of 20-40 symbols per stream.
struct DecodeTables {
  static constexpr int BUCKET_BITS = 7;
  static constexpr int BUCKETS = 1 << BUCKET_BITS;
  static constexpr int SPAN = 1 << (12 - BUCKET_BITS);  // slots per bucket
  static constexpr uint16_t MULTI = 1u << 15;
  static_assert(2 * SPAN <= 128, "s0, split (0..SPAN) and multi must fit 16 bits");
  int base = 0;                  // the first symbol covered
  int stride = 0;                // symbols covered + 1
  std::vector<uint16_t> bucket;  // [channels][BUCKETS], then 2 bytes of padding
  std::vector<uint32_t> range;   // [channels][stride]
};

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out);

// One blob of `rows` x `channels` symbols to decode into `out` (row-major). The blob is
// untrusted: on any inconsistency `error` says what is wrong and `out` holds garbage; the
// decoder never reads outside [data, data + size).
struct BlobTask {
  const uint8_t* data;
  size_t size;
  int rows, channels;
  const DecodeTables* tables;
  uint8_t* out;
  std::string error;
};

// Decodes every task. The AVX2 path (decode_avx2.cpp; bit-identical) runs where the CPU
// has it and interleaves up to four consecutive tasks of equal shape, so that their
// independent lane states keep the gathers of one core busy; else the scalar path.
void decode_blobs(BlobTask* tasks, size_t n);

// The decode path in use ("avx2" or "scalar"), and a switch for tests and benchmarks:
// "scalar", "avx2" (false if the CPU lacks it) or "auto". KVCODEC_SIMD=scalar in the
// environment starts on the scalar path.
const char* simd_path();
bool set_simd_path(const std::string& name);

}  // namespace kvc
