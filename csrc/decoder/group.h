// One decode step (t, g) of a blob, scalar: shared by the scalar decoder (every group) and
// the AVX2 decoder (groups of fewer than 16 lanes). Layout in common/rans.h.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "../common/rans.h"
#include "decoder.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace kvc {

static_assert(DecodeTables::SHIFT == PROB_BITS - DecodeTables::BUCKET_BITS,
              "a bucket's slots: the probability scale over BUCKETS");

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Four 32-bit table entries at the four indices in idx by scalar loads: how both SIMD
// paths read their tables where this CPU's gathers are slow (decoder.cpp measures which);
// the indices come out as two 64-bit pairs and the entries go back in by lane inserts.
__attribute__((target("sse4.1"))) static inline __m128i four_loads(const int* base,
                                                                   __m128i idx) {
  const uint64_t a = (uint64_t)_mm_cvtsi128_si64(idx), b = (uint64_t)_mm_extract_epi64(idx, 1);
  __m128i r = _mm_cvtsi32_si128(base[(uint32_t)a]);
  r = _mm_insert_epi32(r, base[a >> 32], 1);
  r = _mm_insert_epi32(r, base[(uint32_t)b], 2);
  return _mm_insert_epi32(r, base[b >> 32], 3);
}
#endif

static inline uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// The range index of `slot` in a multi bucket (DecodeTables): X within [lo, hi), else
// stepped back from X - 1 or on from X (the first present symbol's cum 0 and the
// sentinel bound both walks).
static inline uint32_t multi_index(uint32_t e, uint32_t slot, const uint32_t* grange) {
  const uint32_t offset = slot & (DecodeTables::SPAN - 1);
  const uint32_t lo = (e >> DecodeTables::LO_SHIFT) & 63, hi = (e >> DecodeTables::HI_SHIFT) & 63;
  uint32_t r = e & DecodeTables::X_MASK;
  if (offset < lo) {
    --r;
    while (slot < (grange[r] >> 16)) --r;
  } else if (offset >= hi) {
    while (slot >= (grange[r + 1] >> 16)) ++r;
  }
  return r;
}

// Decodes the `n` lanes of group `first / LANES` of one row into row[first ..), then
// refills them in lane order from `words`; false if the word stream runs out.
static inline bool scalar_group(uint32_t* state, int n, int first, const DecodeTables& tables,
                                uint8_t* row, const uint8_t* words, size_t n_words,
                                size_t* pos) {
  const int stride = tables.stride;
  const uint32_t* gbucket = tables.bucket.data() + (size_t)first * DecodeTables::BUCKETS;
  const uint32_t* grange = tables.range.data() + (size_t)first * stride;
  // Two passes: the lanes' table lookups are independent and overlap; only the refills
  // are ordered (they share one word stream).
  for (int j = 0; j < n; ++j) {
    uint32_t x = state[j];
    const uint32_t slot = x & PROB_MASK;
    const uint32_t e = gbucket[(size_t)j * DecodeTables::BUCKETS + (slot >> DecodeTables::SHIFT)];
    // r1 - 1 before the split, r1 from it on; a `multi` entry: multi_index.
    uint32_t r = (e & DecodeTables::R_MASK) - ((slot & (DecodeTables::SPAN - 1)) < (e >> 24));
    if (e & DecodeTables::MULTI) r = multi_index(e, slot, grange);
    const uint32_t v = grange[r];
    dec_advance(&x, v & 0xffff, v >> 16);
    row[first + j] = (uint8_t)(r - (uint32_t)(j * stride - tables.base));
    state[j] = x;
  }
  for (int j = 0; j < n; ++j) {
    if (dec_needs_word(state[j])) {
      if (*pos >= n_words) return false;
      state[j] = dec_refill(state[j], (uint16_t)(words[2 * *pos] | (words[2 * *pos + 1] << 8)));
      ++*pos;
    }
  }
  return true;
}

// Asks for a stream's tables in L2 before its blobs decode. A chunk of many streams
// (as a stream loads) decodes each blob with another stream's tables, which are cold
// then; fetched up front, their lines come in parallel instead of one gather miss at a
// time (6% faster on such chunks, no change where the tables are warm).
static inline void prefetch_tables(const DecodeTables& tables, int channels) {
  const char* b = reinterpret_cast<const char*>(tables.bucket.data());
  const size_t nb = (size_t)channels * DecodeTables::BUCKETS * sizeof(uint32_t);
  for (size_t o = 0; o < nb; o += 64) __builtin_prefetch(b + o, 0, 2);
  const char* r = reinterpret_cast<const char*>(tables.range.data());
  const size_t nr = (size_t)channels * tables.stride * sizeof(uint32_t);
  for (size_t o = 0; o < nr; o += 64) __builtin_prefetch(r + o, 0, 2);
}

// The blob's lane states, checked: used lanes below L are invalid, unused ones must be L.
static inline const char* load_states(const uint8_t* blob, size_t size, int channels,
                                      uint32_t* state) {
  if (size < (size_t)STATE_BYTES) return "blob shorter than its lane states";
  if ((size - STATE_BYTES) % 2) return "blob has an odd number of word bytes";
  for (int j = 0; j < LANES; ++j) {
    state[j] = load_u32(blob + 4 * j);
    const bool used = j < channels;
    if (used ? state[j] < RANS_L : state[j] != RANS_L) return "invalid initial lane state";
  }
  return nullptr;
}

// The integrity check at the end: every lane back at L, every word read.
static inline const char* final_check(const uint32_t* state, int channels, size_t pos,
                                      size_t n_words) {
  for (int j = 0; j < (channels < LANES ? channels : LANES); ++j)
    if (state[j] != RANS_L) return "corrupt blob (final lane state mismatch)";
  if (pos != n_words) return "corrupt blob (unread words at the end)";
  return nullptr;
}

// The tables and word stream of one blob in flight (the SIMD decoders).
struct Flight {
  const uint8_t* words = nullptr;
  size_t n_words = 0, pos = 0;
  const uint32_t* bucket = nullptr;
  const uint32_t* range = nullptr;
  int stride = 0;
  const DecodeTables* tables = nullptr;
  uint8_t* out = nullptr;

  Flight() = default;
  explicit Flight(const BlobTask& t)
      : words(t.data + STATE_BYTES), n_words((t.size - STATE_BYTES) / 2),
        bucket(t.tables->bucket.data()), range(t.tables->range.data()),
        stride(t.tables->stride), tables(t.tables), out(t.out) {}

  // The scalar step of lanes [0, n) of group first / LANES in row `row` (an offset).
  bool scalar_step(uint32_t* state, int n, int first, size_t row) {
    return scalar_group(state, n, first, *tables, out + row, words, n_words, &pos);
  }
};

// A partial last group of at most this many lanes runs the scalar step on them (moved
// out of and back into the vector registers): a masked vector step costs as much as a
// full one (two gathers) for a few symbols, and the scalar step uses the integer units,
// which the vector steps leave idle. Channels are commonly a multiple of 16 plus one
// (the step code).
constexpr int SCALAR_REST = 4;

// The scalar decoder of one blob: "" or what is wrong with it.
std::string decode_blob_scalar(const uint8_t* blob, size_t size, int rows, int channels,
                               const DecodeTables& tables, uint8_t* out);

// The SIMD decoders (decode_avx2.cpp, decode_avx512.cpp): decode_blobs's paths, to call
// only where avx2_available() / avx512_available(). Each decodes up to its interleave of
// consecutive blobs of the same channels together, over the rows they all have, then
// those with more rows on: a stream's last chunk is often shorter than the rest, and
// alone it decoded at about half the speed per symbol.
constexpr int AVX2_INTERLEAVE = 4;
constexpr int AVX512_INTERLEAVE = 8;
constexpr int MAX_TABLES_TOGETHER = 4;
// Each reads its tables with the hardware's gathers, or (`loads`) with scalar loads;
// probe_gather (gather_probe.cpp) times a decode (one of these) both ways.
void decode_blobs_avx2(BlobTask* tasks, size_t n, bool loads);
void decode_blobs_avx512(BlobTask* tasks, size_t n, bool loads);
bool avx2_available();
bool avx512_available();
GatherProbe probe_gather(void (*decode)(BlobTask*, size_t, bool));

// The order in which a group's n tasks end (their indices, most rows first, ties in
// task order): those still going after any row are a prefix.
static inline void longest_first(const BlobTask* tasks, int n, int* order) {
  for (int i = 0; i < n; ++i) {
    int j = i;
    for (; j > 0 && tasks[order[j - 1]].rows < tasks[i].rows; --j) order[j] = order[j - 1];
    order[j] = i;
  }
}

// A group of n tasks in the order longest_first gives: `rows(k, t0, t1)` steps the first
// k of them (those still going) over rows [t0, t1), and `finish(i)` checks the i-th's end
// once its rows are done; the first error either returns stops the group.
template <class Rows, class Finish>
static inline const char* by_row_runs(const BlobTask* tasks, const int* order, int n,
                                      Rows&& rows, Finish&& finish) {
  for (int k = n, t0 = 0; k > 0;) {
    const int t1 = tasks[order[k - 1]].rows;
    if (const char* err = rows(k, t0, t1)) return err;
    for (; k > 0 && tasks[order[k - 1]].rows == t1; --k)
      if (const char* err = finish(k - 1)) return err;
    t0 = t1;
  }
  return nullptr;
}

// Runs `decode_k(tasks, k)` (null or an error) on runs of up to max_k consecutive tasks of
// the same channels that use at most max_tables distinct tables (those of up to 4 streams fit
// a core's L2 together; 8 blobs of 8 streams, as a chunk of a stream loads, did not),
// each of those tables prefetched once; a run that fails is decoded again one task at a
// time, to say which task is bad and why.
static inline void decode_in_groups(BlobTask* tasks, size_t n, size_t max_k,
                                    size_t max_tables,
                                    const char* (*decode_k)(const BlobTask*, int)) {
  for (size_t i = 0; i < n;) {
    size_t j = i + 1, distinct = 1;
    prefetch_tables(*tasks[i].tables, tasks[i].channels);
    while (j < n && j - i < max_k && tasks[j].channels == tasks[i].channels) {
      bool seen = false;
      for (size_t k = i; k < j && !seen; ++k) seen = tasks[k].tables == tasks[j].tables;
      if (!seen) {
        if (distinct == max_tables) break;
        prefetch_tables(*tasks[j].tables, tasks[j].channels);
        ++distinct;
      }
      ++j;
    }
    if (decode_k(tasks + i, (int)(j - i))) {
      for (size_t k = i; k < j; ++k) {
        const char* err = decode_k(tasks + k, 1);
        tasks[k].error = err ? err : "";
      }
    }
    i = j;
  }
}

}  // namespace kvc
