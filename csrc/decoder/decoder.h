// CPU rANS decoder for blobs written by the encoder (layout in common/rans.h).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>

namespace kvc {

// An array left uninitialized when allocated (every entry of a table is written by the
// build: zeroing them first was a fifth of it), and taken from a process-wide pool of
// freed ones where one fits: a file's tables are megabytes, and fresh memory costs a
// page fault per 4 KiB on first write (5 of the 7 ms a 60-stream file's tables took to
// build on a VM). The pool keeps at most 64 MiB.
class Words {
 public:
  Words() = default;
  Words(Words&& o) noexcept : p_(o.p_), cap_(o.cap_) { o.p_ = nullptr, o.cap_ = 0; }
  Words& operator=(Words&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_, cap_ = o.cap_;
      o.p_ = nullptr, o.cap_ = 0;
    }
    return *this;
  }
  Words(const Words&) = delete;
  Words& operator=(const Words&) = delete;
  ~Words() { release(); }

  void allocate(size_t n);
  uint32_t* data() { return p_; }
  const uint32_t* data() const { return p_; }

 private:
  void release();
  uint32_t* p_ = nullptr;
  size_t cap_ = 0;  // entries
};

// Per-channel decode tables, built once per stream and reused for all its blobs. Compact,
// so that the tables of all of a file's streams stay in the last-level cache when a file
// is decoded chunk by chunk (a flat slot -> symbol map would be 4 KiB per channel, ~1 MB
// per stream and ~60 MB per file, and each chunk would refetch it from memory). They
// cover only the symbols [base, base + stride - 1) that some channel of the stream uses:
//   range  [channels][stride]: freq | cum << 16 per symbol, then a sentinel cum = 2^12;
//   bucket [channels][BUCKETS]: for the 2^12 / BUCKETS slots from b * 2^12 / BUCKETS,
//     r1 | split << 24 | multi << 31. r1 is the range index, within the channel's group
//     of 16 (lane * stride + symbol less base), of s0 + 1, where s0 holds the bucket's
//     first slot; s0 + 1 starts at slot `split` of the bucket (SPAN: not in it); multi is
//     set when s0 + 1 does not hold every slot of the bucket from there on.
//   A `multi` bucket (three or more symbols start in it) reads differently:
//     x | lo << 16 | hi << 22 | 1 << 31, where x is the range index of X, the symbol
//     holding most of the bucket's slots, which holds its slots [lo, hi) (hi = SPAN:
//     to the end). A slot in [lo, hi) is X's, with no further lookup; one before lo
//     steps back from X - 1 while the slot lies before that symbol's cum, one at or past
//     hi steps on from X while it lies at or past the next symbol's cum. Widened
//     tables (a store's shared tables) put a few one-slot symbols beside the most
//     frequent symbol of a tail: stepping from the bucket's first symbol cost most
//     SIMD steps a gather per one-slot symbol, because some lane lands there.
// A slot's range index is r1 - 1, or r1 if the slot lies at or past the split (multi
// buckets: see above; the multi bit makes the split read past every slot). Indexing
// the range table directly saves the decoder an add per lookup. About 0.6 KiB per
// channel for the shipped quantizers, whose 256-symbol alphabets use a span of 20-40
// symbols per stream.
struct DecodeTables {
  static constexpr int BUCKET_BITS = 7;
  static constexpr int BUCKETS = 1 << BUCKET_BITS;
  static constexpr int SHIFT = 12 - BUCKET_BITS;  // slot >> SHIFT: its bucket (PROB_BITS 12)
  static constexpr int SPAN = 1 << SHIFT;         // slots per bucket
  static constexpr uint32_t MULTI = 1u << 31;
  static constexpr uint32_t R_MASK = (1u << 24) - 1;
  static constexpr uint32_t X_MASK = (1u << 16) - 1;  // multi: X's range index
  static constexpr int LO_SHIFT = 16, HI_SHIFT = 22;  // multi: X's slots [lo, hi)
  static_assert(SPAN < 64, "split (0..SPAN) must fit 6 bits");
  static_assert(16 * 257 < (1 << 16), "a range index within a group fits X_MASK");
  int base = 0;                  // the first symbol covered
  int stride = 0;                // symbols covered + 1
  Words bucket;  // [channels][BUCKETS]
  Words range;   // [channels][stride], then 8 spare entries
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

// Decodes every task. The SIMD paths (decode_avx512.cpp, decode_avx2.cpp; bit-identical)
// run where the CPU has them and interleave up to decode_interleave() consecutive tasks
// of the same channels (their rows may differ), so that their independent lane states
// keep the gathers of one core busy; else the scalar path.
void decode_blobs(BlobTask* tasks, size_t n);

// The decode path in use ("avx512", "avx2" or "scalar"), and a switch for tests and
// benchmarks: a path's name (false if the CPU lacks it) or "auto". KVCODEC_SIMD=avx2 or
// =scalar in the environment caps the path a process starts on.
const char* simd_path();
bool set_simd_path(const std::string& name);

// How the SIMD paths read their decode tables: "hardware" (256- or 512-bit gathers) or
// "loads" (scalar loads, four per 128 bits); the same bits either way. Which is faster
// differs by CPU more than a list of CPU models can say (gather_probe.cpp), so each path
// measures it on its first decode in a process and keeps the faster, unless
// KVCODEC_GATHER=hardware or =loads in the environment, or set_simd_gather (either name,
// or "auto": back to the environment's or the measured choice; false for another name),
// sets it. simd_gather() is the mode of the path in use ("hardware" on the scalar one).
const char* simd_gather();
bool set_simd_gather(const std::string& name);

// The measurement behind the path in use's choice (seconds to decode the same synthetic
// blobs each way, the best of three rounds); zeros on the scalar path.
struct GatherProbe {
  double hardware_s = 0, loads_s = 0;
};
GatherProbe gather_probe();

// How many blobs the path in use decodes together (1 on the scalar path).
int decode_interleave();

}  // namespace kvc
