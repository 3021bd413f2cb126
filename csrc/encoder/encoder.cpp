#include "encoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common/rans.h"

namespace kvc {

void cumulative(const uint16_t* freqs, int channels, int alphabet, uint32_t* cums) {
  for (int c = 0; c < channels; ++c) {
    uint32_t acc = 0;
    for (int s = 0; s < alphabet; ++s) {
      cums[(size_t)c * alphabet + s] = acc;
      acc += freqs[(size_t)c * alphabet + s];
    }
  }
}

namespace {

// Per-thread scratch larger than this is freed after use rather than kept for the next.
constexpr size_t kKeepScratch = 8u << 20;

// x / f for a coder state x (32 bits) and a frequency 1 <= f <= PROB_SCALE by a multiply
// instead of a division: floor(x * ceil(2^64 / f) / 2^64) is exactly floor(x / f) for
// every 32-bit x and every f below 2^32 (Lemire, Kaser and Kurz, "Faster remainder by
// direct computation", 2019); ceil(2^64 / f) = (2^64 - 1) / f + 1 for f >= 2, and f = 1
// (2^64 itself) is its own case.
struct Reciprocals {
  uint64_t m[PROB_SCALE + 1];
  Reciprocals() {
    m[0] = m[1] = 0;
    for (uint32_t f = 2; f <= PROB_SCALE; ++f) m[f] = ~0ull / f + 1;
  }
};

inline uint32_t div_freq(uint32_t x, uint32_t f, const uint64_t* m) {
  const uint32_t q = (uint32_t)(((unsigned __int128)m[f] * x) >> 64);
  return f == 1 ? x : q;
}

}  // namespace

uint32_t div_by_freq(uint32_t x, uint32_t f) {
  static const Reciprocals rcp;
  return div_freq(x, f, rcp.m);
}

std::string encode_blob(const uint8_t* symbols, int rows, int channels, const uint16_t* freqs,
                        const uint32_t* cums, int alphabet, std::vector<uint8_t>* out) {
  static const Reciprocals rcp;
  uint32_t state[LANES];
  for (int j = 0; j < LANES; ++j) state[j] = RANS_L;
  // Words are written without a branch and kept when renormalizing: room for one more
  // per symbol of a row is made before the row (a blob rarely needs more than one word per
  // two symbols). The buffer is the thread's, reused across blobs unless it grew large.
  thread_local std::vector<uint16_t> buffer;
  buffer.resize(std::max(buffer.size(), (size_t)rows * channels / 2 + channels + 16));
  uint16_t* words = buffer.data();
  size_t n_words = 0;
  const int groups = (channels + LANES - 1) / LANES;
  constexpr uint64_t kBound = (uint64_t)((RANS_L >> PROB_BITS) << 16);
  // Reverse of the decode order: tokens, groups and lanes all descending.
  for (int t = rows - 1; t >= 0; --t) {
    const uint8_t* row = symbols + (size_t)t * channels;
    if (n_words + channels > buffer.size()) {
      buffer.resize(2 * buffer.size() + channels);
      words = buffer.data();
    }
    for (int g = groups - 1; g >= 0; --g) {
      const int first = g * LANES;
      const int last = std::min(channels, first + LANES) - 1;
      for (int c = last; c >= first; --c) {
        const uint32_t s = row[c];
        const size_t k = (size_t)c * alphabet + s;
        const uint32_t f = s < (uint32_t)alphabet ? freqs[k] : 0;
        if (f == 0) {
          return "symbol " + std::to_string(s) + " at token " + std::to_string(t) + ", channel " +
                 std::to_string(c) + " has zero frequency in its table";
        }
        // enc_renorm then enc_put (common/rans.h), without branches on the data: the
        // word is always written and kept only when the state is at or over its bound,
        // and the division is a multiply.
        uint32_t x = state[c - first];
        const bool renorm = (uint64_t)x >= kBound * f;
        words[n_words] = (uint16_t)(x & 0xffff);
        n_words += renorm;
        x = renorm ? x >> 16 : x;
        const uint32_t q = div_freq(x, f, rcp.m);
        state[c - first] = (q << PROB_BITS) + (x - q * f) + cums[k];
      }
    }
  }
  out->resize(STATE_BYTES + 2 * n_words);
  uint8_t* p = out->data();
  for (int j = 0; j < LANES; ++j) {
    for (int b = 0; b < 4; ++b) *p++ = (uint8_t)(state[j] >> (8 * b));
  }
  for (size_t i = n_words; i-- > 0;) {
    *p++ = (uint8_t)(words[i] & 0xff);
    *p++ = (uint8_t)(words[i] >> 8);
  }
  if (buffer.size() > kKeepScratch / sizeof(uint16_t)) std::vector<uint16_t>().swap(buffer);
  return std::string();
}

uint8_t level_of(uint64_t count, uint64_t peak);

namespace {

// B[j] = 2^(-(2j+1)/4), descending: round(2 log2 r) = -j for B[j] < r < B[j-1].
struct Boundaries {
  double b[31];
  Boundaries() {
    for (int j = 0; j < 31; ++j) b[j] = std::exp2(-(2.0 * j + 1.0) / 4.0);
  }
};

// levels_from_counts' own arithmetic.
uint8_t level_by_log(uint64_t count, uint64_t peak) {
  const double rel = std::log2((double)count / (double)peak);
  double lv = (double)MAX_LEVEL + 2.0 * std::nearbyint(2.0 * rel);
  lv = std::min(std::max(lv, 1.0), (double)MAX_LEVEL);
  return (uint8_t)lv;
}

// level_of for every peak up to kSmallPeak (a chunk's tables: peaks are at most its
// tokens), built once: [peak][count].
constexpr int kSmallPeak = 256;

struct SmallLevels {
  uint8_t lv[kSmallPeak + 1][kSmallPeak + 1];
  SmallLevels() {
    for (int p = 1; p <= kSmallPeak; ++p)
      for (int c = 1; c <= p; ++c) lv[p][c] = level_of(c, p);
  }
};

inline uint8_t level_fast(uint32_t count, uint32_t peak) {
  if (peak <= (uint32_t)kSmallPeak) {
    static const SmallLevels small;
    return small.lv[peak][count];
  }
  return level_of(count, peak);
}

}  // namespace

uint8_t level_of(uint64_t count, uint64_t peak) {
  // Which pair of boundaries the ratio lies between, by comparisons instead of a log2 per
  // symbol. The ratio of two integers is never a boundary (an odd power of 2^(1/4)), and
  // farther than 1e-9 (relative) from every boundary log2's last-bit error cannot move
  // the rounding, so both give the same level; nearer (never seen below peaks of 2^31),
  // the log2 decides, as levels_from_counts does.
  static const Boundaries bounds;
  const double* b = bounds.b;
  const double r = (double)count / (double)peak;
  int j = 0;  // the number of boundaries above r (branch-free: the data decides)
  for (int i = 0; i < 31; ++i) j += b[i] > r;
  constexpr double kMargin = 1e-9;
  if ((j > 0 && r > b[j - 1] * (1.0 - kMargin)) || (j < 31 && r < b[j] * (1.0 + kMargin))) {
    return level_by_log(count, peak);
  }
  return (uint8_t)std::max(1, MAX_LEVEL - 2 * j);
}

std::string stream_tables(const uint8_t* symbols, int rows, int channels, int alphabet,
                          const int64_t* groups, uint16_t* freqs, uint8_t* spans,
                          std::vector<uint8_t>* codes) {
  if (alphabet < 1 || alphabet > MAX_ALPHABET) return "alphabet must be in [1, 256]";
  // Scratch reused across the streams a thread builds (no page faults per stream).
  thread_local std::vector<uint32_t> counts, pooled;
  thread_local std::vector<int> source, first;
  thread_local std::vector<size_t> code_at, code_len;
  thread_local std::vector<int> low, high;
  // (MAX_ALPHABET spare counters: a symbol outside the alphabet, reported below, is
  // counted without a bounds check and must land inside the buffer.)
  counts.assign((size_t)channels * alphabet + MAX_ALPHABET, 0);
  // Histograms a block of channels at a time, so that the counters being bumped stay in
  // the L1 cache (a counter row per channel is alphabet * 4 bytes), and each channel's
  // smallest and largest symbol, so that only that span of its row is read back.
  constexpr int kBlock = 16;
  low.assign(channels, 0);
  high.assign(channels, 0);
  for (int c0 = 0; c0 < channels; c0 += kBlock) {
    const int nb = std::min(kBlock, channels - c0);
    uint32_t* base = counts.data() + (size_t)c0 * alphabet;
    uint8_t mn[kBlock], mx[kBlock];
    std::fill(mn, mn + kBlock, 255);
    std::fill(mx, mx + kBlock, 0);
    if (nb == kBlock) {  // fixed trip counts on a local copy: the min/max loops vectorize
      for (int t = 0; t < rows; ++t) {
        uint8_t v[kBlock];
        std::memcpy(v, symbols + (size_t)t * channels + c0, kBlock);
        for (int k = 0; k < kBlock; ++k) {
          mn[k] = std::min(mn[k], v[k]);
          mx[k] = std::max(mx[k], v[k]);
        }
        for (int k = 0; k < kBlock; ++k) ++base[(size_t)k * alphabet + v[k]];
      }
    } else {
      for (int t = 0; t < rows; ++t) {
        const uint8_t* row = symbols + (size_t)t * channels + c0;
        for (int k = 0; k < nb; ++k) {
          mn[k] = std::min(mn[k], row[k]);
          mx[k] = std::max(mx[k], row[k]);
          ++base[(size_t)k * alphabet + row[k]];
        }
      }
    }
    for (int k = 0; k < nb; ++k) {
      if (rows && mx[k] >= alphabet) {
        for (int t = 0; t < rows; ++t) {
          const uint8_t v = symbols[(size_t)t * channels + c0 + k];
          if (v >= alphabet) {
            return "symbol " + std::to_string(v) + " at token " + std::to_string(t) +
                   ", channel " + std::to_string(c0 + k) + " is outside the alphabet";
          }
        }
      }
      low[c0 + k] = rows ? mn[k] : 0;
      high[c0 + k] = rows ? mx[k] : 0;
    }
  }
  // Pooled histograms: row c uses the sum over every channel of its group, source[c].
  source.resize(channels);
  for (int c = 0; c < channels; ++c) source[c] = c;
  if (groups) {
    pooled.assign((size_t)channels * alphabet, 0);
    for (int c = 0; c < channels; ++c) {
      const int64_t g = groups[c];
      if (g < 0 || g >= channels) return "groups: entry " + std::to_string(c) + " is out of range";
      uint32_t* dst = pooled.data() + (size_t)g * alphabet;
      const uint32_t* src = counts.data() + (size_t)c * alphabet;
      for (int s = 0; s < alphabet; ++s) dst[s] += src[s];
      source[c] = (int)g;
    }
    counts.swap(pooled);
    // A pooled row's span: from the smallest to the largest symbol of its members.
    std::vector<int> plo(channels, alphabet), phi(channels, -1);
    for (int c = 0; c < channels; ++c) {
      if (!rows) continue;
      plo[source[c]] = std::min(plo[source[c]], low[c]);
      phi[source[c]] = std::max(phi[source[c]], high[c]);
    }
    for (int c = 0; c < channels; ++c) {
      low[c] = rows && phi[c] >= 0 ? plo[c] : 0;
      high[c] = rows && phi[c] >= 0 ? phi[c] : 0;
    }
  }
  // Each distinct source row once: its levels, frequencies, span and codes; channels
  // sharing a pooled row copy them (identical inputs give identical tables).
  uint8_t lv[MAX_ALPHABET];
  first.assign(channels, -1);  // per source row, the first channel using it
  code_at.resize(channels);
  code_len.resize(channels);
  codes->reserve(codes->size() + (size_t)channels * 16);
  for (int c = 0; c < channels; ++c) {
    const int g = source[c];
    uint16_t* f = freqs + (size_t)c * alphabet;
    if (first[g] >= 0) {
      const int k = first[g];
      std::copy(freqs + (size_t)k * alphabet, freqs + (size_t)(k + 1) * alphabet, f);
      spans[2 * (size_t)c] = spans[2 * (size_t)k];
      spans[2 * (size_t)c + 1] = spans[2 * (size_t)k + 1];
      const size_t at = codes->size();
      codes->resize(at + code_len[k]);
      std::copy(codes->begin() + code_at[k], codes->begin() + code_at[k] + code_len[k],
                codes->begin() + at);
      code_at[c] = at;
      code_len[c] = code_len[k];
      continue;
    }
    first[g] = c;
    const uint32_t* cnt = counts.data() + (size_t)g * alphabet;
    // The span of present symbols (row g's: a pooled row's is g's own entry).
    int lo = low[g], hi = high[g];
    uint32_t peak = 0;
    for (int s = lo; s <= hi; ++s) peak = std::max(peak, cnt[s]);
    if (peak == 0) {  // a channel without tokens: level 63 on symbol 0
      lo = hi = 0;
      lv[0] = MAX_LEVEL;
    } else {
      uint32_t last_count = 0;
      uint8_t last_level = 0;
      for (int s = lo; s <= hi; ++s) {
        if (!cnt[s]) {
          lv[s] = 0;
          continue;
        }
        if (cnt[s] != last_count) {  // runs of equal counts are common in sparse tables
          last_count = cnt[s];
          last_level = level_fast(cnt[s], peak);
        }
        lv[s] = last_level;
      }
    }
    // normalize_freqs only looks at the span of present symbols, so the span alone gives
    // the same frequencies; everything outside it is 0.
    std::fill(f, f + lo, 0);
    std::fill(f + hi + 1, f + alphabet, 0);
    if (!normalize_freqs(lv + lo, hi - lo + 1, f + lo)) {
      return "channel " + std::to_string(c) + " has no table";  // cannot happen
    }
    spans[2 * (size_t)c] = (uint8_t)lo;
    spans[2 * (size_t)c + 1] = (uint8_t)hi;
    code_at[c] = codes->size();
    code_len[c] = (size_t)(hi - lo + 1);
    for (int s = lo; s <= hi; ++s) codes->push_back(lv[s] ? (uint8_t)(64 - lv[s]) : 0);
  }
  if (counts.capacity() * sizeof(uint32_t) > kKeepScratch) {
    std::vector<uint32_t>().swap(counts);
    std::vector<uint32_t>().swap(pooled);
  }
  return std::string();
}

namespace {

// Round to the nearest integer, ties to even (torch.round), for |v| <= 2^22: adding and
// taking away 1.5 * 2^23 leaves no fraction bits, in the default rounding mode. The
// quantizers clamp to their integer range first (the same as clamping after rounding,
// since the bounds are integers), so this holds, and unlike nearbyint it vectorizes.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

}  // namespace

bool stream_input(const float* x, size_t head_stride, int heads, int rows, int head_dim,
                  const float* cos, const float* sin, int rotary_dim, float divisor,
                  float* out) {
  const int channels = heads * head_dim, half = rotary_dim / 2;
  const int rd = cos ? rotary_dim : 0;
  // Non-finite check without a branch: a value's exponent bits plus one exponent step
  // carry into the sign bit exactly when they are all ones (NaN or infinity).
  uint32_t special = 0;
  for (int h = 0; h < heads; ++h) {
    for (int t = 0; t < rows; ++t) {
      const float* xr = x + (size_t)h * head_stride + (size_t)t * head_dim;
      float* o = out + (size_t)t * channels + (size_t)h * head_dim;
      if (rd) {
        const float* cs = cos + (size_t)t * rotary_dim;
        const float* sn = sin + (size_t)t * rotary_dim;
        for (int i = 0; i < half; ++i) {
          const float a = xr[i] * cs[i], b = -xr[i + half] * sn[i];
          o[i] = (a - b) / divisor;
        }
        for (int i = half; i < rd; ++i) {
          const float a = xr[i] * cs[i], b = xr[i - half] * sn[i];
          o[i] = (a - b) / divisor;
        }
      }
      for (int i = rd; i < head_dim; ++i) o[i] = xr[i];
      for (int i = 0; i < head_dim; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &o[i], 4);
        special |= (bits & 0x7f800000u) + 0x00800000u;
      }
    }
  }
  return !(special & 0x80000000u);
}

void quantize_token(const float* x, const uint8_t* code, int rows, int channels,
                    const float* grid, const float* mult, int half_range, uint8_t* out) {
  const float r = (float)half_range;
  for (int t = 0; t < rows; ++t) {
    const float* xr = x + (size_t)t * channels;
    uint8_t* o = out + (size_t)t * (channels + 1);
    const uint8_t k = code[t];
    o[channels] = k;
    if (k == 0) {
      for (int c = 0; c < channels; ++c) o[c] = (uint8_t)half_range;
      continue;
    }
    const float g = grid[k];
    for (int c = 0; c < channels; ++c) {
      const float step = g * mult[c];
      o[c] = (uint8_t)(round_even(std::min(std::max(xr[c] / step, -r), r)) + r);
    }
  }
}

void quantize_absmax(const float* x, const float* inv, int rows, int channels, int m,
                     uint8_t* out) {
  const float mf = (float)m, top = (float)(2 * m);
  for (int t = 0; t < rows; ++t) {
    const float* xr = x + (size_t)t * channels;
    uint8_t* o = out + (size_t)t * channels;
    const float f = inv[t];
    for (int c = 0; c < channels; ++c) {
      const float a = xr[c] * f;
      o[c] = (uint8_t)round_even(std::min(std::max(a + mf, 0.0f), top));
    }
  }
}

}  // namespace kvc
