#include "decoder.h"

#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

#include "../common/rans.h"
#include "group.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kvc {

namespace {
// Freed arrays for Words. Never destroyed: tables that Python frees at interpreter exit
// may return theirs after static destructors have run.
struct Pool {
  std::mutex mu;
  std::vector<std::pair<size_t, uint32_t*>> blocks;  // (entries, block)
  size_t entries = 0;
  static constexpr size_t MAX_ENTRIES = (64u << 20) / sizeof(uint32_t);
};
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}
}  // namespace

void Words::allocate(size_t n) {
  release();
  Pool& pl = pool();
  {
    std::lock_guard<std::mutex> lock(pl.mu);
    size_t best = pl.blocks.size();  // the smallest block that fits, wasting at most half
    for (size_t i = 0; i < pl.blocks.size(); ++i) {
      const size_t c = pl.blocks[i].first;
      if (c >= n && c <= 2 * n + 64 && (best == pl.blocks.size() || c < pl.blocks[best].first))
        best = i;
    }
    if (best < pl.blocks.size()) {
      cap_ = pl.blocks[best].first;
      p_ = pl.blocks[best].second;
      pl.entries -= cap_;
      pl.blocks[best] = pl.blocks.back();
      pl.blocks.pop_back();
      return;
    }
  }
  p_ = new uint32_t[n];
  cap_ = n;
}

void Words::release() {
  if (!p_) return;
  Pool& pl = pool();
  {
    std::lock_guard<std::mutex> lock(pl.mu);
    if (pl.entries + cap_ <= Pool::MAX_ENTRIES) {
      pl.blocks.emplace_back(cap_, p_);
      pl.entries += cap_;
      p_ = nullptr;
    }
  }
  delete[] p_;
  p_ = nullptr;
  cap_ = 0;
}

// Writes freq | cum << 16 for the symbols [0, width) of one row (cum: the exclusive prefix
// sum; in up to 7 entries past width, garbage) and returns the row's total. Eight symbols
// a step with SSE2 (part of x86-64): this loop was half of a table build.
static uint32_t fill_range_row(const uint16_t* f, int width, uint32_t* range) {
#if defined(__SSE2__)
  __m128i carry = _mm_setzero_si128();  // the total of the blocks before, in every lane
  __m128i total = _mm_setzero_si128();  // 32-bit partial totals (a bad table may pass 2^16)
  const __m128i zero = _mm_setzero_si128();
  for (int s = 0; s < width; s += 8) {
    __m128i v;
    if (s + 8 <= width) {
      v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(f + s));
    } else {  // the last, partial block: no read past the row
      alignas(16) uint16_t tail[8] = {0};
      memcpy(tail, f + s, 2 * (size_t)(width - s));
      v = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    __m128i p = _mm_add_epi16(v, _mm_slli_si128(v, 2));
    p = _mm_add_epi16(p, _mm_slli_si128(p, 4));
    p = _mm_add_epi16(p, _mm_slli_si128(p, 8));  // inclusive prefix sums in the block
    const __m128i cum = _mm_add_epi16(_mm_sub_epi16(p, v), carry);
    const __m128i last = _mm_shufflehi_epi16(p, 0xff);
    carry = _mm_add_epi16(carry, _mm_unpackhi_epi64(last, last));
    total = _mm_add_epi32(total, _mm_add_epi32(_mm_unpacklo_epi16(v, zero),
                                               _mm_unpackhi_epi16(v, zero)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(range + s), _mm_unpacklo_epi16(v, cum));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(range + s + 4), _mm_unpackhi_epi16(v, cum));
  }
  alignas(16) uint32_t t[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), total);
  return t[0] + t[1] + t[2] + t[3];
#else
  uint32_t cum = 0;
  for (int s = 0; s < width; ++s) {
    range[s] = f[s] | (cum << 16);
    cum += f[s];
  }
  return cum;
#endif
}

// The entry of a multi bucket from slot `start` whose first slot symbol s holds (see
// DecodeTables): X is the symbol holding most of its slots, `row` the group's range
// index of symbol 0.
static uint32_t multi_entry(const uint32_t* range, int s, int width, uint32_t start,
                            uint32_t row) {
  constexpr uint32_t SPAN = DecodeTables::SPAN;
  uint32_t best = 0, lo = 0, hi = 0;
  int x = s;
  for (int t = s; t < width && (range[t] >> 16) < start + SPAN; ++t) {
    const uint32_t c0 = range[t] >> 16, c1 = c0 + (range[t] & 0xffff);
    const uint32_t a = std::max(c0, start), e = std::min(c1, start + SPAN);
    if (e > a && e - a > best) {
      best = e - a;
      x = t;
      lo = a - start;
      hi = e - start;
    }
  }
  return (row + x) | lo << DecodeTables::LO_SHIFT | hi << DecodeTables::HI_SHIFT |
         DecodeTables::MULTI;
}

void build_tables(const uint16_t* freqs, int channels, int alphabet, DecodeTables* out) {
  constexpr int B = DecodeTables::BUCKETS, SHIFT = DecodeTables::SHIFT;
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
  out->bucket.allocate((size_t)channels * B);
  // + 8: fill_range_row writes whole blocks of 8 entries (the next row overwrites them).
  out->range.allocate((size_t)channels * out->stride + 8);
  for (int c = 0; c < channels; ++c) {
    const uint16_t* f = freqs + (size_t)c * alphabet + lo;
    uint32_t* range = out->range.data() + (size_t)c * out->stride;
    if (fill_range_row(f, width, range) > PROB_SCALE) {
      // Tables are validated to sum to PROB_SCALE; clamp anyway.
      uint32_t cum = 0;
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
    uint32_t* bucket = out->bucket.data() + (size_t)c * B;
    constexpr uint32_t SPAN = DecodeTables::SPAN;
    const uint32_t r1 = (uint32_t)(c % LANES) * out->stride + 1;  // + s: s + 1's range index
    uint32_t filled = 0;  // buckets [0, filled) are done
    for (int s = 0; s < width && filled < (uint32_t)B; ++s) {
      const uint32_t fs = range[s] & 0xffff, c0 = range[s] >> 16;
      if (!fs) continue;
      const uint32_t next = s + 1 < width ? c0 + fs : PROB_SCALE;  // s + 1's cum
      // Buckets starting in [c0, c0 + fs): those that end before next s holds whole.
      const uint32_t b0 = (c0 + SPAN - 1) >> SHIFT;
      const uint32_t end = std::min<uint32_t>(B, (c0 + fs + SPAN - 1) >> SHIFT);
      const uint32_t whole = std::max(b0, std::min(end, next >> SHIFT));
      std::fill(bucket + b0, bucket + whole, (r1 + s) | SPAN << 24);
      for (uint32_t b = whole; b < end; ++b) {  // at most one: it holds next
        const uint32_t start = b << SHIFT, last = start + SPAN - 1;
        // s + 1 holds [next, its end); with freq 0 its end is next itself.
        const bool multi = s + 2 <= width && (range[s + 2] >> 16) <= last;
        bucket[b] = multi ? multi_entry(range, s, width, start, r1 - 1)
                          : (r1 + s) | (next - start) << 24;
      }
      filled = end;
    }
    // Buckets past the total: X = the first present symbol, every slot steps on from it.
    std::fill(bucket + filled, bucket + B, (r1 - 1 + first) | DecodeTables::MULTI);
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

// The index of `name` among `n` names, or -1.
static int name_index(const char* const* names, int n, const char* name) {
  for (int i = 0; i < n; ++i)
    if (strcmp(name, names[i]) == 0) return i;
  return -1;
}

// The decode paths, slowest first; -1: not decided yet. KVCODEC_SIMD (scalar, avx2 or
// avx512) caps the path for a process; otherwise the best the CPU has.
enum Path { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
static const char* const kPathNames[] = {"scalar", "avx2", "avx512"};
static std::atomic<int> g_simd{-1};

static bool path_available(int p) {
  return p == SCALAR || (p == AVX2 && avx2_available()) || (p == AVX512 && avx512_available());
}

static int best_path(int cap) {
  int p = cap;
  while (p > SCALAR && !path_available(p)) --p;
  return p;
}

static int simd_mode() {
  int m = g_simd.load(std::memory_order_relaxed);
  if (m < 0) {
    const char* env = getenv("KVCODEC_SIMD");
    const int cap = env ? name_index(kPathNames, AVX512 + 1, env) : -1;
    m = best_path(cap < 0 ? AVX512 : cap);
    g_simd.store(m, std::memory_order_relaxed);
  }
  return m;
}

const char* simd_path() { return kPathNames[simd_mode()]; }

bool set_simd_path(const std::string& name) {
  if (name == "auto") {
    g_simd.store(-1);
    return true;
  }
  const int p = name_index(kPathNames, AVX512 + 1, name.c_str());
  if (p < 0 || !path_available(p)) return false;
  g_simd.store(p);
  return true;
}

// How the SIMD paths read their tables. g_forced: -2 not read yet, -1 measured (no
// KVCODEC_GATHER), else the mode named there or by set_simd_gather; g_measured: each
// path's measured mode (-1 not yet), found by its first decode (gather_probe.cpp).
enum Gather { HARDWARE = 0, LOADS = 1 };
static const char* const kGatherNames[] = {"hardware", "loads"};
static std::atomic<int> g_forced{-2};
static std::atomic<int> g_measured[AVX512 + 1] = {{-1}, {-1}, {-1}};
static GatherProbe g_probe[AVX512 + 1];
static std::mutex g_probe_lock;

// Path `path`'s faster mode, measured by its first call.
static int measured_mode(int path) {
  int m = g_measured[path].load(std::memory_order_acquire);
  if (m < 0) {
    std::lock_guard<std::mutex> lock(g_probe_lock);
    m = g_measured[path].load(std::memory_order_relaxed);
    if (m < 0) {
      g_probe[path] = probe_gather(path == AVX2 ? decode_blobs_avx2 : decode_blobs_avx512);
      m = g_probe[path].loads_s < g_probe[path].hardware_s ? LOADS : HARDWARE;
      g_measured[path].store(m, std::memory_order_release);
    }
  }
  return m;
}

static int gather_mode(int path) {
  int f = g_forced.load(std::memory_order_relaxed);
  if (f == -2) {
    const char* env = getenv("KVCODEC_GATHER");
    f = env ? name_index(kGatherNames, LOADS + 1, env) : -1;
    g_forced.store(f, std::memory_order_relaxed);
  }
  if (f >= 0) return f;
  return path == SCALAR ? HARDWARE : measured_mode(path);
}

const char* simd_gather() { return kGatherNames[gather_mode(simd_mode())]; }

GatherProbe gather_probe() {
  const int path = simd_mode();
  if (path == SCALAR) return GatherProbe{};
  measured_mode(path);
  return g_probe[path];  // written once, before g_measured[path] (released)
}

bool set_simd_gather(const std::string& name) {
  if (name == "auto") {
    g_forced.store(-2);
    return true;
  }
  const int g = name_index(kGatherNames, LOADS + 1, name.c_str());
  if (g < 0) return false;
  g_forced.store(g);
  return true;
}

int decode_interleave() {
  switch (simd_mode()) {
    case AVX512: return AVX512_INTERLEAVE;
    case AVX2: return AVX2_INTERLEAVE;
    default: return 1;
  }
}

void decode_blobs(BlobTask* tasks, size_t n) {
  switch (simd_mode()) {
    case AVX512: return decode_blobs_avx512(tasks, n, gather_mode(AVX512) == LOADS);
    case AVX2: return decode_blobs_avx2(tasks, n, gather_mode(AVX2) == LOADS);
    default:
      for (size_t i = 0; i < n; ++i) {
        BlobTask& t = tasks[i];
        t.error = decode_blob_scalar(t.data, t.size, t.rows, t.channels, *t.tables, t.out);
      }
  }
}

}  // namespace kvc
