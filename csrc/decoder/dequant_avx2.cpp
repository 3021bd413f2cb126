// AVX2 variant of dequant_token (dequant.h): eight channels at a time, the same IEEE
// single-precision multiplies and adds in the same order as the scalar variant (and as
// the PyTorch path), no FMA, so the output is bit-identical. Compiled for AVX2 by
// function attribute only, like decode_avx2.cpp.
#include "decoder/dequant.h"

#include <string.h>

#include "decoder/decoder.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_AVX2 __attribute__((target("avx2")))

namespace kvc {

namespace {

// Eight float32 -> bfloat16 as to_bf16 rounds them (dequant.h).
KVC_AVX2 inline __m256i bf16_bits(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}

// One head's row of float32 (aligned, head_dim % 16 == 0) stored as bfloat16.
KVC_AVX2 inline void store_bf16(const float* x, int d, uint16_t* o) {
  for (int i = 0; i < d; i += 16) {
    const __m256i p = _mm256_packus_epi32(bf16_bits(_mm256_load_ps(x + i)),
                                          bf16_bits(_mm256_load_ps(x + i + 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), _mm256_permute4x64_epi64(p, 0xd8));
  }
}

// Head k of row t's symbols and how they dequantize, (s - R) * (step * mult), eight
// channels at a time (at(i)); ok() is false once a symbol past 2R was met.
struct HeadRow {
  const uint8_t* s;
  const float* m;
  __m256 step;
  __m256i top, r, bad;

  KVC_AVX2 HeadRow(const uint8_t* symbols, int t, int k, const DequantSpec& spec) {
    const int d = spec.head_dim, c = spec.heads * d;
    const uint8_t* row = symbols + (size_t)t * (c + 1);
    s = row + (size_t)k * d;
    m = spec.mult + (size_t)k * d;
    step = _mm256_set1_ps(spec.grid[row[c]]);
    top = _mm256_set1_epi32(2 * spec.half_range);
    r = _mm256_set1_epi32(spec.half_range);
    bad = _mm256_setzero_si256();
  }
  KVC_AVX2 __m256 at(int i) {
    const __m256i v =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
    bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(v, top));
    const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, r));
    return _mm256_mul_ps(q, _mm256_mul_ps(step, _mm256_loadu_ps(m + i)));
  }
  KVC_AVX2 bool ok() const { return _mm256_testz_si256(bad, bad); }
};

// Head k's per-channel means for row t (a centered stream), or null.
inline const float* head_means(int t, int k, const DequantSpec& spec, int row0) {
  const int c = spec.heads * spec.head_dim;
  const float* add_row = spec.add && spec.add_rows
                             ? spec.add + (size_t)((row0 + t) / spec.add_rows) * c
                             : spec.add;
  return add_row ? add_row + (size_t)k * spec.head_dim : nullptr;
}

// One head of one row dequantized into x (head_dim aligned floats); false where a symbol
// is out of range.
KVC_AVX2 inline bool load_row(const uint8_t* symbols, int t, int k, const DequantSpec& spec,
                              float* x) {
  HeadRow h(symbols, t, k, spec);
  for (int i = 0; i < spec.head_dim; i += 8) _mm256_store_ps(x + i, h.at(i));
  return h.ok();
}

// The rest of head k's row t from its values (value(i): channels i .. i + 7): add the
// means, rotate (a first-half lane with its partner half d/2 on: x * cos + (-x[i +
// half]) * sin, and x[i + half] * cos + x[i] * sin), store. The values and the means
// stay in registers. `res`: head_dim aligned floats, where a bfloat16 output's values are
// made before they are rounded into it.
// `held`: made in res only, the caller stores it (spread_tile). `sunk`: a sink row's
// values (dequant.h), which take no means.
template <class Values>
KVC_AVX2 inline void emit_row(int t, int k, const DequantSpec& spec, int row0, float* res,
                              Values value, bool held = false, bool sunk = false) {
  const int d = spec.head_dim, half = d / 2;
  const float* a = sunk ? nullptr : head_means(t, k, spec, row0);
  const bool keep = !held && row_kept(spec, row0 + t), dense = keep && dense_out(spec);
  const size_t off = keep ? out_offset(spec, k, row0 + t) : 0;
  float* o = spec.out && dense ? spec.out + off : res;  // else made in res, stored below
  // Straight to memory where it can (aligned): the caches would only hold what the
  // next rows evict, and a store that misses first reads the line it writes.
  const bool nt = o != res && !((uintptr_t)o & 31);
  auto put = [&](float* at, __m256 v) KVC_AVX2 {
    if (nt) {
      _mm256_stream_ps(at, v);
    } else {
      _mm256_storeu_ps(at, v);
    }
  };
  auto meant = [&](int i) KVC_AVX2 {
    const __m256 x = value(i);
    return a ? _mm256_add_ps(x, _mm256_loadu_ps(a + i)) : x;
  };
  if (!spec.cos) {
    for (int i = 0; i < d; i += 8) put(o + i, meant(i));
  } else {
    const size_t at = (size_t)(row0 + t) * d;
    const float* cs = spec.cos + at;
    const float* sn = spec.sin + at;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < half; i += 8) {
      const __m256 lo = meant(i), hi = meant(i + half);
      put(o + i, _mm256_add_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(cs + i)),
                               _mm256_mul_ps(_mm256_xor_ps(hi, sign), _mm256_loadu_ps(sn + i))));
      put(o + i + half, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(cs + i + half)),
                                      _mm256_mul_ps(lo, _mm256_loadu_ps(sn + i + half))));
    }
  }
  if (!keep) return;
  if (!dense) {
    store_spread(res, spec, off);
  } else if (!spec.out) {
    store_bf16(res, d, spec.out_bf16 + off);
  }
}

// The rest of a head's row from its values x (aligned): emit_row.
KVC_AVX2 inline void finish_row(int t, int k, const DequantSpec& spec, int row0,
                                const float* x, float* res, bool sunk = false) {
  emit_row(t, k, spec, row0, res, [x](int i) KVC_AVX2 { return _mm256_load_ps(x + i); },
           false, sunk);
}

// Head k of a row from its symbols (h), or where `sink` is given (a sink row's values,
// all channels: SinkWalk::at) from there, its symbols still checked by h: emit_row.
template <class Row>
KVC_AVX2 inline void emit_head(int t, int k, const DequantSpec& spec, int row0, float* res,
                               Row& h, const float* sink, bool held) {
  if (!sink) {
    emit_row(t, k, spec, row0, res, [&h](int i) KVC_AVX2 { return h.at(i); }, held);
    return;
  }
  for (int i = 0; i < spec.head_dim; i += 8) h.at(i);
  const float* x = sink + (size_t)k * spec.head_dim;
  emit_row(t, k, spec, row0, res, [x](int i) KVC_AVX2 { return _mm256_loadu_ps(x + i); },
           held, true);
}

// One head of one row straight from its symbols to its output: load_row's and
// finish_row's operations in the same order (the same bits), the values never stored.
// load_row then finish_row stored the values, added the means into a second copy and
// read both back: three stores of the row for one. False where a symbol is out of range
// (the row's output is written all the same; the decode then fails).
KVC_AVX2 inline bool direct_row(const uint8_t* symbols, int t, int k, const DequantSpec& spec,
                                int row0, float* res, const float* sink) {
  HeadRow h(symbols, t, k, spec);
  emit_head(t, k, spec, row0, res, h, sink, false);
  return h.ok();
}

// Eight rows of eight floats (a, lanes 0..7 each) transposed in place: a[j] becomes
// lane j of every row.
KVC_AVX2 inline void transpose8(__m256* a) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    a[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

constexpr int SPREAD = 8;  // rows of a tile whose channels are stored across them

// Sixteen values (lo, then hi) stored in order at `at`, float32 or bfloat16.
KVC_AVX2 inline void store16(__m256 lo, __m256 hi, const DequantSpec& spec, size_t at) {
  if (spec.out) {
    _mm256_storeu_ps(spec.out + at, lo);
    _mm256_storeu_ps(spec.out + at + 8, hi);
    return;
  }
  const __m256i p = _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(spec.out_bf16 + at),
                      _mm256_permute4x64_epi64(p, 0xd8));
}

// a0 b0 a1 b1 ... a7 b7, as (lo, hi).
KVC_AVX2 inline void zip8(__m256 a, __m256 b, __m256* lo, __m256* hi) {
  const __m256 l = _mm256_unpacklo_ps(a, b), h = _mm256_unpackhi_ps(a, b);
  *lo = _mm256_permute2f128_ps(l, h, 0x20);
  *hi = _mm256_permute2f128_ps(l, h, 0x31);
}

// Whether rows r .. r + n - 1 are all stored, each `gap` elements after the one before.
inline bool rows_apart(const DequantSpec& spec, int r, int n, int gap) {
  if (!spec.row_at || spec.row_at[r] < 0) return false;
  for (int i = 1; i < n; ++i)
    if (spec.row_at[r + i] != spec.row_at[r] + (int64_t)i * gap) return false;
  return true;
}

// A tile's rows into a layout of interleaved pairs (chan_at, chan_zip: vLLM's AMX
// layouts), sixteen values a store where the rows allow it (each value on its own took
// as long as vLLM's op writing the buffers afterwards): ZIP_CHANNELS, eight rows two
// apart, channels c and c + 1 of the rows zipped (the keys' [head_dim / 2, block, 2]);
// ZIP_ROWS, each pair of adjacent rows zipped channel by channel (the values' pairs of
// tokens). Other rows one value at a time.
KVC_AVX2 void zip_tile(const float* tile, int m, int r0, int k, const DequantSpec& spec) {
  const int d = spec.head_dim;
  if (spec.chan_zip == ZIP_CHANNELS && m == SPREAD && rows_apart(spec, r0, SPREAD, 2)) {
    const size_t off = out_offset(spec, k, r0);
    for (int c = 0; c < d; c += 8) {
      __m256 a[8], lo, hi;
      for (int i = 0; i < 8; ++i) a[i] = _mm256_load_ps(tile + i * d + c);
      transpose8(a);  // a[j]: channel c + j of the eight rows
      for (int j = 0; j < 8; j += 2) {
        zip8(a[j], a[j + 1], &lo, &hi);
        store16(lo, hi, spec, off + (size_t)spec.chan_at[c + j]);
      }
    }
    return;
  }
  for (int i = 0; i < m; ++i) {
    if (spec.chan_zip == ZIP_ROWS && i + 1 < m && rows_apart(spec, r0 + i, 2, 1)) {
      const size_t off = out_offset(spec, k, r0 + i);
      const float *x = tile + i * d, *y = x + d;
      for (int c = 0; c < d; c += 8) {
        __m256 lo, hi;
        zip8(_mm256_load_ps(x + c), _mm256_load_ps(y + c), &lo, &hi);
        store16(lo, hi, spec, off + (size_t)spec.chan_at[c]);
      }
      ++i;
    } else if (row_kept(spec, r0 + i)) {
      store_spread(tile + i * d, spec, out_offset(spec, k, r0 + i));
    }
  }
}

// Head k's rows t0 .. t0 + m - 1, made in `tile` (SPREAD rows of head_dim floats), stored
// with channels chan_stride apart, or where chan_at puts them (zip_tile). Eight rows
// placed one after another (a paged cache keeps a block's keys [head_dim, block]:
// channel i of consecutive tokens is contiguous) go in eight-wide stores of a channel
// across the rows; other rows one value at a time.
KVC_AVX2 void spread_tile(const float* tile, int m, int t0, int k, const DequantSpec& spec,
                          int row0) {
  const int r0 = row0 + t0, d = spec.head_dim;
  if (spec.chan_at) return zip_tile(tile, m, r0, k, spec);
  if (!(m == SPREAD && rows_apart(spec, r0, SPREAD, 1))) {
    for (int i = 0; i < m; ++i)
      if (row_kept(spec, r0 + i)) store_spread(tile + i * d, spec, out_offset(spec, k, r0 + i));
    return;
  }
  const size_t off = out_offset(spec, k, r0), cs = spec.chan_stride;
  for (int c = 0; c < d; c += 8) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_load_ps(tile + i * d + c);
    transpose8(a);  // a[j]: channel c + j of the eight rows
    for (int j = 0; j < 8; ++j) {
      const size_t at = off + (size_t)(c + j) * cs;
      if (spec.out) {
        _mm256_storeu_ps(spec.out + at, a[j]);
      } else {
        const __m256i b = bf16_bits(a[j]);
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0xd8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(spec.out_bf16 + at),
                         _mm256_castsi256_si128(p));
      }
    }
  }
}

// Rows whose channels are spread (dense_out false), SPREAD rows of a head at a time:
// direct_row's operations, made in a tile and stored by spread_tile; the first bad row in
// row order is set in *bad_row, and the decode stops there.
KVC_AVX2 void spread_rows(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                          int* bad_row) {
  alignas(32) float tile[SPREAD * 256];
  SinkWalk sinks(spec, row0);
  for (int t0 = 0; t0 < rows; t0 += SPREAD) {
    const int m = rows - t0 < SPREAD ? rows - t0 : SPREAD;
    const float* sink[SPREAD];
    for (int i = 0; i < m; ++i, sinks.next()) sink[i] = sinks.at();
    int bad = -1;  // the tile's first bad row over all heads: the first in row order
    for (int k = 0; k < spec.heads; ++k) {
      for (int i = 0; i < m; ++i) {
        HeadRow h(symbols, t0 + i, k, spec);
        emit_head(t0 + i, k, spec, row0, tile + i * spec.head_dim, h, sink[i], true);
        if (!h.ok()) {
          bad = bad < 0 || t0 + i < bad ? t0 + i : bad;
          break;
        }
      }
      if (bad < 0) spread_tile(tile, m, t0, k, spec, row0);
    }
    if (bad >= 0) {
      *bad_row = bad;
      return;
    }
  }
}

// A klt stream's rows: head by head, so that the head's basis stays in the caches over the
// rows, a tile of rows at a time. Each row of the tile is dequantized and its terms
// listed; then the basis's blocks (basis.cpp) sum the tile's rows, two at a time on
// AVX-512 (its kernel sums two rows in one loop), one on AVX2; then the rows are
// finished. A tile is those one or two rows, or TILE rows where a head's basis is 256 KiB
// (head_dim 256): each row read it whole from L2, a tile's rows read each block's slice
// (32 KiB) from L1 (the inverse 1.8-2x faster on synthetic rows). At 64 and 128 the
// larger tile was slower (its rows' stores come in bursts). False at the first bad row
// met, which may not be the first in row order. Into a spread output (a paged cache's
// transposed keys) the finished rows of a head go by SPREAD rows through spread_tile, as
// spread_rows stores them (one value at a time, the decode into a paged cache took 4-7%
// longer: 60 klt streams of 1,920 rows, 39% nonzero terms).
constexpr int TILE = 16;

KVC_AVX2 bool klt_rows(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                       bool wide) {
  const int d = spec.head_dim, cb = basis_block(d, wide), step = wide ? 2 : 1;
  const int tile_rows = d >= 256 ? TILE : step;
  // Untiled, every block of a row (pair) at once; tiled, a block over all the rows. Out
  // of the loops: a division per tile was 2% of a klt decode (perf, AVX2).
  const int blocks = d / cb, per_call = tile_rows > step ? 1 : blocks;
  const size_t padded = (size_t)(d + 1) * d, tile = (size_t)TILE * d;
  float* basis = basis_scratch(padded + 3 * tile);
  float* vals = basis + padded;  // the tile's terms, d slots per row
  int* off = reinterpret_cast<int*>(vals + tile);
  float* y = vals + 2 * tile;  // the tile's rows: their values, then their sums
  alignas(32) float res[256];
  alignas(32) float spread[SPREAD * 256];  // finished rows of a spread output, by tiles
  const bool spreading = !dense_out(spec);
  int count[TILE];
  const float* sink[TILE];
  for (int k = 0; k < spec.heads; ++k) {
    int held = 0;  // rows of head k made in `spread`, not stored yet
    pad_basis(spec.basis + (size_t)k * d * d, d, cb, basis);
    SinkWalk sinks(spec, row0);
    for (int t0 = 0; t0 < rows; t0 += tile_rows) {
      const int m = rows - t0 < tile_rows ? rows - t0 : tile_rows;
      for (int i = 0; i < m; ++i, sinks.next()) {
        sink[i] = sinks.at();
        if (wide) {  // straight from the symbols (basis_load_terms)
          const uint8_t* row = symbols + (size_t)(t0 + i) * (spec.heads * d + 1);
          count[i] = basis_load_terms(row + (size_t)k * d, spec.mult + (size_t)k * d,
                                      spec.grid[row[spec.heads * d]], spec.half_range, d, cb,
                                      vals + i * d, off + i * d);
          if (count[i] < 0) return false;
          continue;
        }
        if (!load_row(symbols, t0 + i, k, spec, y + i * d)) return false;
        count[i] = basis_terms(y + i * d, d, cb, vals + i * d, off + i * d);
      }
      for (int b = 0; b < blocks; b += per_call)
        for (int i = 0; i < m; i += step) {
          const int pair = i + 1 < m ? step : 1;  // rows summed together: n terms each
          const int n = pair > 1 && count[i + 1] > count[i] ? count[i + 1] : count[i];
          const float* v[2] = {vals + i * d, vals + (i + 1) * d};
          const int* o[2] = {off + i * d, off + (i + 1) * d};
          float* out[2] = {y + i * d, y + (i + 1) * d};
          basis_sums(v, o, pair, (n + 1) & ~1, basis, d, cb, b, b + per_call, out, wide);
        }
      for (int i = 0; i < m; ++i) {
        if (sink[i])  // a sink row: its exact values replace the sums
          for (int c = 0; c < d; c += 8)
            _mm256_store_ps(y + i * d + c, _mm256_loadu_ps(sink[i] + (size_t)k * d + c));
        if (!spreading) {
          finish_row(t0 + i, k, spec, row0, y + i * d, res, sink[i] != nullptr);
          continue;
        }
        const float* x = y + i * d;
        emit_row(t0 + i, k, spec, row0, spread + held * d,
                 [x](int c) KVC_AVX2 { return _mm256_load_ps(x + c); }, true,
                 sink[i] != nullptr);
        if (++held == SPREAD) {
          spread_tile(spread, SPREAD, t0 + i + 1 - SPREAD, k, spec, row0);
          held = 0;
        }
      }
    }
    if (held) spread_tile(spread, held, rows - held, k, spec, row0);
  }
  return true;
}

}  // namespace

KVC_AVX2 bool dequant_token_avx2(const uint8_t* symbols, int rows, const DequantSpec& spec,
                                 int row0, int* bad_row) {
  const int h = spec.heads, d = spec.head_dim;
  if (d % 16) return false;
  // Rows stored straight to memory (emit_row) are ordered before whatever follows the
  // decode (the caller's thread join), on every way out of here.
  struct Fence {
    ~Fence() { _mm_sfence(); }
  } fence;
  alignas(32) float res[256];  // a bfloat16 output's row before it is rounded (head_dim
                               // <= 256 here; else scalar)
  if (d > 256 || (spec.basis && !basis_simd_ok())) return false;
  *bad_row = -1;
  if (!spec.basis && !dense_out(spec)) {
    spread_rows(symbols, rows, spec, row0, bad_row);
    return true;
  }
  if (!spec.basis) {
    SinkWalk sinks(spec, row0);
    for (int t = 0; t < rows; ++t, sinks.next())
      for (int k = 0; k < h; ++k)
        if (!direct_row(symbols, t, k, spec, row0, res, sinks.at())) {
          *bad_row = t;
          return true;
        }
    return true;
  }
  if (klt_rows(symbols, rows, spec, row0, strcmp(simd_path(), "avx512") == 0)) return true;
  const size_t stride = (size_t)h * d + 1;  // the first bad row in row order, as the
  for (int u = 0; u < rows && *bad_row < 0; ++u)  // other paths report it
    for (int i = 0; i < h * d; ++i)
      if (symbols[(size_t)u * stride + i] > 2 * spec.half_range) {
        *bad_row = u;
        break;
      }
  return true;
}

}  // namespace kvc

#else

namespace kvc {
bool dequant_token_avx2(const uint8_t*, int, const DequantSpec&, int, int*) { return false; }
}  // namespace kvc

#endif
