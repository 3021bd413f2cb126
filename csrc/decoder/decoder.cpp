#include "decoder.h"

#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/rans.h"
#include "group.h"

namespace kvc {

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out) {
  constexpr int B = DecodeTables::BUCKETS, SHIFT = PROB_BITS - DecodeTables::BUCKET_BITS;
  // The span any channel uses, from the OR of all rows (a vectorizable pass; scanning
  // each row for its ends was most of the build).
  std::vector<uint16_t> any(alphabet, 0);
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet;
    for (int s = 0; s < alphabet; ++s) any[s] |= f[s];
  }
  int lo = 0, hi = alphabet - 1;
  while (lo < alphabet && any[lo] == 0) ++lo;
  while (hi >= 0 && any[hi] == 0) --hi;
  if (hi < lo) lo = hi = 0;  // all-zero tables (rejected upstream): one symbol, never matched
  out->base = lo;
  const int width = hi - lo + 1;
  out->stride = width + 1;
  // +1: the AVX2 decoder gathers the 16-bit entries with 32-bit loads.
  out->bucket.assign((size_t)channels * B + 1, 0);
  out->range.assign((size_t)channels * out->stride, 0);
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet + lo;
    uint32_t* range = out->range.data() + (size_t)c * out->stride;
    uint32_t cum = 0;
    for (int s = 0; s < width; ++s) {
      range[s] = f[s] | (cum << 16);
      cum += f[s];
    }
    if (cum > PROB_SCALE) {  // tables are validated to sum to PROB_SCALE; clamp anyway
      cum = 0;
      for (int s = 0; s < width; ++s) {
        const uint32_t fs = std::min<uint32_t>(f[s], PROB_SCALE - cum);
        range[s] = fs | (cum << 16);
        cum += fs;
      }
    }
    int first = 0;  // the channel's first present symbol (0 if none)
    while (first < width && !(range[first] & 0xffff)) ++first;
    if (first == width) first = 0;
    range[width] = PROB_SCALE << 16;  // sentinel: no slot lies at or past it
    // Each bucket's s0 is the symbol holding its first slot: one walk over the present
    // symbols (zero-frequency ones hold no slot), filling the buckets that start within
    // each; only the last of them can hold a boundary. Buckets past the table's total
    // (only in tables that do not sum to PROB_SCALE) have no symbol: they are `multi`
    // from the first present symbol, and the step loop, bounded by the sentinel, finds
    // one.
    uint16_t* bucket = out->bucket.data() + (size_t)c * B;
    constexpr uint32_t SPAN = DecodeTables::SPAN;
    uint32_t filled = 0;  // buckets [0, filled) are done
    for (int s = 0; s < width && filled < (uint32_t)B; ++s) {
      const uint32_t fs = range[s] & 0xffff, c0 = range[s] >> 16;
      if (!fs) continue;
      const uint32_t next = s + 1 < width ? c0 + fs : PROB_SCALE;  // s + 1's cum
      // Buckets starting in [c0, c0 + fs): those that end before next s holds whole.
      const uint32_t b0 = (c0 + SPAN - 1) >> SHIFT;
      const uint32_t end = std::min<uint32_t>(B, (c0 + fs + SPAN - 1) >> SHIFT);
      const uint32_t whole = std::max(b0, std::min(end, next >> SHIFT));
      std::fill(bucket + b0, bucket + whole, (uint16_t)(s | SPAN << 8));
      for (uint32_t b = whole; b < end; ++b) {  // at most one: it holds next
        const uint32_t start = b << SHIFT, last = start + SPAN - 1;
        // s + 1 holds [next, its end); with freq 0 its end is next itself.
        const bool multi = s + 2 <= width && (range[s + 2] >> 16) <= last;
        bucket[b] = (uint16_t)(s | (next - start) << 8 | (multi ? DecodeTables::MULTI : 0u));
      }
      filled = end;
    }
    std::fill(bucket + filled, bucket + B, (uint16_t)(first | SPAN << 8 | DecodeTables::MULTI));
  }
}

std::string decode_blob_scalar(const uint8_t* blob, size_t size, int rows, int channels,
                               const DecodeTables& tables, uint8_t* out) {
  uint32_t state[LANES];
  if (const char* err = load_states(blob, size, channels, state)) return err;
  const uint8_t* words = blob + STATE_BYTES;
  const size_t n_words = (size - STATE_BYTES) / 2;
  size_t pos = 0;
  const int groups = (channels + LANES - 1) / LANES;
  for (int t = 0; t < rows; ++t) {
    uint8_t* row = out + (size_t)t * channels;
    for (int g = 0; g < groups; ++g) {
      const int first = g * LANES;
      const int n = std::min(channels - first, LANES);
      if (!scalar_group(state, n, first, tables, row, words, n_words, &pos))
        return "truncated word stream";
    }
  }
  const char* err = final_check(state, channels, pos, n_words);
  return err ? err : std::string();
}

// -1: not decided yet; 0: scalar; 1: AVX2. KVCODEC_SIMD=scalar forces the scalar path.
static std::atomic<int> g_simd{-1};

static int simd_mode() {
  int m = g_simd.load(std::memory_order_relaxed);
  if (m < 0) {
    const char* env = getenv("KVCODEC_SIMD");
    m = (env && strcmp(env, "scalar") == 0) ? 0 : (avx2_available() ? 1 : 0);
    g_simd.store(m, std::memory_order_relaxed);
  }
  return m;
}

const char* simd_path() { return simd_mode() ? "avx2" : "scalar"; }

bool set_simd_path(const std::string& name) {
  if (name == "scalar") { g_simd.store(0); return true; }
  if (name == "avx2" && avx2_available()) { g_simd.store(1); return true; }
  if (name == "auto") { g_simd.store(-1); return true; }
  return false;
}

void decode_blobs(BlobTask* tasks, size_t n) {
  if (simd_mode()) return decode_blobs_avx2(tasks, n);
  for (size_t i = 0; i < n; ++i) {
    BlobTask& t = tasks[i];
    t.error = decode_blob_scalar(t.data, t.size, t.rows, t.channels, *t.tables, t.out);
  }
}

}  // namespace kvc
