#include "decoder.h"

#include <string.h>

#include <stdlib.h>

#include <algorithm>
#include <atomic>

#include "../common/rans.h"
#include "group.h"

namespace kvc {

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out) {
  constexpr int B = DecodeTables::BUCKETS, SHIFT = PROB_BITS - DecodeTables::BUCKET_BITS;
  int lo = alphabet, hi = -1;  // the span any channel uses
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet;
    int a = 0, b = alphabet - 1;
    while (a < lo && f[a] == 0) ++a;
    while (b > hi && f[b] == 0) --b;
    lo = std::min(lo, a);
    hi = std::max(hi, b);
  }
  if (hi < lo) lo = hi = 0;  // all-zero tables (rejected upstream): one symbol, never matched
  out->base = lo;
  const int width = hi - lo + 1;
  out->stride = width + 1;
  // +4: the AVX2 decoder gathers bytes with 32-bit loads.
  out->bucket.assign((size_t)channels * B + 4, 0);
  out->range.assign((size_t)channels * out->stride, 0);
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet + lo;
    uint8_t* bucket = out->bucket.data() + (size_t)c * B;
    uint32_t* range = out->range.data() + (size_t)c * out->stride;
    uint32_t cum = 0;
    for (int s = 0; s < width; ++s) {
      // Tables are validated to sum to PROB_SCALE; clamp defensively anyway.
      const uint32_t fs = std::min<uint32_t>(f[s], PROB_SCALE - cum);
      range[s] = fs | (cum << 16);
      // Buckets whose first slot falls in [cum, cum + fs) start at this symbol.
      for (uint32_t b = (cum + (1u << SHIFT) - 1) >> SHIFT; b < (uint32_t)B && (b << SHIFT) < cum + fs; ++b)
        bucket[b] = (uint8_t)s;
      cum += fs;
    }
    range[width] = PROB_SCALE << 16;  // sentinel: no slot lies at or past it
  }
}

static std::string decode_blob_scalar(const uint8_t* blob, size_t size, int rows, int channels,
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

std::string decode_blob(const uint8_t* blob, size_t size, int rows, int channels,
                        const DecodeTables& tables, uint8_t* out) {
  if (simd_mode()) return decode_blob_avx2(blob, size, rows, channels, tables, out);
  return decode_blob_scalar(blob, size, rows, channels, tables, out);
}

}  // namespace kvc
