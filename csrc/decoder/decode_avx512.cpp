// AVX-512 decoder of the interleaved rANS blob (layout in common/rans.h): a blob's 16 lane
// states are one 512-bit register, so a step is one bucket gather, one range gather and
// one 16-lane refill (a compare into a mask, a popcount, and an expand of the next words
// into the lanes asking for one, in lane order, as the bitstream orders them). Up to
// eight blobs of the same channels (and of at most four streams) decode together, each phase
// of a step issued for all of them before the next, so that their gathers overlap. On
// Zen 4 a 512-bit gather costs two 256-bit ones, but every other step takes half the
// instructions of the AVX2 path's two halves, so twice the steps fit in flight. A gather
// is the hardware's, or sixteen scalar loads where this CPU runs those faster (gather16).
// Bit-identical to the scalar decoder by construction: the same tables and arithmetic,
// lane by lane; a partial last group of a few lanes runs the scalar step itself.
// Compiled for AVX-512F by function attribute only; decode_blobs picks it at run time.
#include <string.h>

#include <string>

#include "../common/rans.h"
#include "decoder.h"
#include "group.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_HAVE_AVX512_BUILD 1
#define KVC_AVX512 __attribute__((target("avx2,popcnt,avx512f")))
#endif

namespace kvc {

#ifdef KVC_HAVE_AVX512_BUILD

bool avx512_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("popcnt");
}

namespace {

// Sixteen 32-bit table entries of the lanes in `active` (others 0): the hardware's
// gather, or (LOADS) sixteen scalar loads, four per 128-bit quarter (four_loads), where
// the CPU's gathers are slow (decoder.cpp measures which). An inactive lane's index is
// not trusted: it reads entry 0.
template <bool LOADS>
KVC_AVX512 inline __m512i gather16(const uint32_t* table, __m512i idx, __mmask16 active) {
  if (!LOADS) return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), active, idx, table, 4);
  const int* base = reinterpret_cast<const int*>(table);
  const bool all = active == 0xffff;
  if (!all) idx = _mm512_maskz_mov_epi32(active, idx);
  const __m256i lo = _mm512_castsi512_si256(idx), hi = _mm512_extracti64x4_epi64(idx, 1);
  const __m256i r0 = _mm256_inserti128_si256(
      _mm256_castsi128_si256(four_loads(base, _mm256_castsi256_si128(lo))),
      four_loads(base, _mm256_extracti128_si256(lo, 1)), 1);
  const __m256i r1 = _mm256_inserti128_si256(
      _mm256_castsi128_si256(four_loads(base, _mm256_castsi256_si128(hi))),
      four_loads(base, _mm256_extracti128_si256(hi, 1)), 1);
  const __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
  return all ? r : _mm512_maskz_mov_epi32(active, r);
}

// One step of the lanes in `active` of a blob's state x (lanes outside keep their state
// and touch no memory), in three phases issued across blobs by the caller:
// lookup16 gathers the bucket entries,
template <bool LOADS>
KVC_AVX512 inline __m512i lookup16(__m512i x, __mmask16 active, __m512i bucket_off,
                                   const uint32_t* gbucket) {
  // (x >> shift) & (BUCKETS - 1) | bucket_off in one ternary-logic op.
  const __m512i bidx = _mm512_ternarylogic_epi32(
      _mm512_srli_epi32(x, DecodeTables::SHIFT), _mm512_set1_epi32(DecodeTables::BUCKETS - 1),
      bucket_off, 0xEA);
  return gather16<LOADS>(gbucket, bidx, active);
}

// index16 turns them into range indices within the group (as scalar_group does),
template <bool LOADS>
KVC_AVX512 inline __m512i index16(__m512i x, __m512i e, const uint32_t* grange) {
  const __m512i offset = _mm512_and_si512(x, _mm512_set1_epi32(DecodeTables::SPAN - 1));
  const __m512i r1 = _mm512_and_si512(e, _mm512_set1_epi32((int)DecodeTables::R_MASK));
  const __mmask16 before = _mm512_cmpgt_epi32_mask(_mm512_srli_epi32(e, 24), offset);
  __m512i r = _mm512_mask_sub_epi32(r1, before, r1, _mm512_set1_epi32(1));
  // `multi` buckets (rare): X within [lo, hi), else a walk back or on (multi_index).
  const __mmask16 multi = _mm512_cmplt_epi32_mask(e, _mm512_setzero_si512());
  if (__builtin_expect(multi != 0, 0)) {
    const __m512i one = _mm512_set1_epi32(1), mask6 = _mm512_set1_epi32(63);
    const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32((int)PROB_MASK));
    const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(e, DecodeTables::LO_SHIFT), mask6);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(e, DecodeTables::HI_SHIFT), mask6);
    __mmask16 back = _mm512_mask_cmpgt_epi32_mask(multi, lo, offset);
    __mmask16 on = _mm512_mask_cmpge_epi32_mask(multi, offset, hi);
    r = _mm512_mask_and_epi32(r, multi, e, _mm512_set1_epi32((int)DecodeTables::X_MASK));
    r = _mm512_mask_sub_epi32(r, back, r, one);
    while (back | on) {
      // back lanes read their own cum, on lanes the next one: one gather for both.
      const __m512i c = _mm512_srli_epi32(
          gather16<LOADS>(grange, _mm512_mask_add_epi32(r, on, r, one), back | on), 16);
      on = _mm512_mask_cmple_epu32_mask(on, c, slot);
      back = _mm512_mask_cmpgt_epu32_mask(back, c, slot);
      r = _mm512_mask_add_epi32(r, on, r, one);
      r = _mm512_mask_sub_epi32(r, back, r, one);
    }
  }
  return r;
}

// and advance16 gathers the range entries and advances the states.
template <bool LOADS>
KVC_AVX512 inline __m512i advance16(__m512i x, __m512i r, __mmask16 active,
                                    const uint32_t* grange) {
  const __m512i v = gather16<LOADS>(grange, r, active);
  const __m512i freq = _mm512_and_si512(v, _mm512_set1_epi32(0xffff));
  const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32((int)PROB_MASK));
  const __m512i y = _mm512_sub_epi32(
      _mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32(x, PROB_BITS)), slot),
      _mm512_srli_epi32(v, 16));
  return _mm512_mask_mov_epi32(x, active, y);
}

// Refills the lanes of `x` below L (within `active`) from the blob's words in lane order;
// false if the stream runs out.
KVC_AVX512 inline bool refill16(__m512i* x, __mmask16 active, Flight* f) {
  const __mmask16 need = _mm512_mask_cmplt_epu32_mask(active, *x, _mm512_set1_epi32(RANS_L));
  const int k = __builtin_popcount((unsigned)need);
  __m512i w;
  if (__builtin_expect(f->pos + 16 <= f->n_words, 1)) {
    w = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(f->words + 2 * f->pos)));
  } else {  // near the end: no 32-byte load past the stream
    if (f->pos + k > f->n_words) return false;
    alignas(32) uint16_t tail[16] = {0};
    memcpy(tail, f->words + 2 * f->pos, 2 * k);
    w = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)));
  }
  *x = _mm512_or_si512(_mm512_mask_slli_epi32(*x, need, *x, 16),
                       _mm512_maskz_expand_epi32(need, w));
  f->pos += k;
  return true;
}

// Rows [t0, t1) of K blobs (of the same channels) in flight together, each blob's lane
// states in xs (kept by decode_group between runs of rows). Returns null, or an error
// that some blob has (the caller then decodes them one by one to say which).
template <int K, bool LOADS>
KVC_AVX512 const char* decode_rows(Flight* flights, __m512i* xs, const __m512i* subs, int t0,
                                   int t1, int channels) {
  const int full = channels / LANES, rest = channels - full * LANES;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i boff = _mm512_mullo_epi32(lane, _mm512_set1_epi32(DecodeTables::BUCKETS));
  const __mmask16 all = 0xffff, part = (__mmask16)((1u << rest) - 1);
  // Local copies: what the loop updates stays in registers (the output stores, bytes,
  // could alias the caller's arrays).
  Flight f[K];
  __m512i x[K], sub[K];  // sub: lane * stride - base, from a range index to the symbol
  for (int k = 0; k < K; ++k) f[k] = flights[k], x[k] = xs[k], sub[k] = subs[k];
  for (int t = t0; t < t1; ++t) {
    const size_t row = (size_t)t * channels;
    for (int g = 0; g < full; ++g) {
      const size_t first = (size_t)g * LANES;
      __m512i e[K], r[K];
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k)
        e[k] = lookup16<LOADS>(x[k], all, boff, f[k].bucket + first * DecodeTables::BUCKETS);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k)
        r[k] = index16<LOADS>(x[k], e[k], f[k].range + first * f[k].stride);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k)
        x[k] = advance16<LOADS>(x[k], r[k], all, f[k].range + first * f[k].stride);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(f[k].out + row + first),
                         _mm512_cvtepi32_epi8(_mm512_sub_epi32(r[k], sub[k])));
        if (!refill16(&x[k], all, &f[k])) return "truncated word stream";
      }
    }
    if (!rest) continue;
    const int first = full * LANES;
    for (int k = 0; k < K; ++k) {
      if (rest <= SCALAR_REST) {  // lane moves, not a store and a reload (that stalls)
        const __m128i lo = _mm512_castsi512_si128(x[k]);
        uint32_t state[4] = {
            (uint32_t)_mm_cvtsi128_si32(lo), (uint32_t)_mm_extract_epi32(lo, 1),
            (uint32_t)_mm_extract_epi32(lo, 2), (uint32_t)_mm_extract_epi32(lo, 3)};
        if (!f[k].scalar_step(state, rest, first, row)) return "truncated word stream";
        x[k] = _mm512_mask_blend_epi32(
            0x000f, x[k],
            _mm512_castsi128_si512(_mm_setr_epi32((int)state[0], (int)state[1], (int)state[2],
                                                  (int)state[3])));
      } else {  // the same step on the group's lanes only
        const uint32_t* gr = f[k].range + (size_t)first * f[k].stride;
        const __m512i e =
            lookup16<LOADS>(x[k], part, boff, f[k].bucket + (size_t)first * DecodeTables::BUCKETS);
        const __m512i r = index16<LOADS>(x[k], e, gr);
        x[k] = advance16<LOADS>(x[k], r, part, gr);
        alignas(16) uint8_t bytes[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(bytes),
                        _mm512_cvtepi32_epi8(_mm512_sub_epi32(r, sub[k])));
        memcpy(f[k].out + row + first, bytes, rest);
        if (!refill16(&x[k], part, &f[k])) return "truncated word stream";
      }
    }
  }
  for (int k = 0; k < K; ++k) flights[k].pos = f[k].pos, xs[k] = x[k];
  return nullptr;
}

template <bool LOADS>
KVC_AVX512 const char* rows_k(int k, Flight* f, __m512i* x, const __m512i* sub, int t0,
                              int t1, int channels) {
  switch (k) {
    case 8: return decode_rows<8, LOADS>(f, x, sub, t0, t1, channels);
    case 7: return decode_rows<7, LOADS>(f, x, sub, t0, t1, channels);
    case 6: return decode_rows<6, LOADS>(f, x, sub, t0, t1, channels);
    case 5: return decode_rows<5, LOADS>(f, x, sub, t0, t1, channels);
    case 4: return decode_rows<4, LOADS>(f, x, sub, t0, t1, channels);
    case 3: return decode_rows<3, LOADS>(f, x, sub, t0, t1, channels);
    case 2: return decode_rows<2, LOADS>(f, x, sub, t0, t1, channels);
    default: return decode_rows<1, LOADS>(f, x, sub, t0, t1, channels);
  }
}

// Up to AVX512_INTERLEAVE blobs of the same channels decoded together: all of them over
// the rows every one has, then those with more rows on (decode_in_groups).
template <bool LOADS>
KVC_AVX512 const char* decode_group(const BlobTask* tasks, int n) {
  const int channels = tasks[0].channels;
  int order[AVX512_INTERLEAVE];
  longest_first(tasks, n, order);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  Flight f[AVX512_INTERLEAVE];
  __m512i x[AVX512_INTERLEAVE], sub[AVX512_INTERLEAVE];
  for (int k = 0; k < n; ++k) {
    const BlobTask& t = tasks[order[k]];
    alignas(64) uint32_t state[LANES];
    if (const char* err = load_states(t.data, t.size, channels, state)) return err;
    x[k] = _mm512_load_si512(state);
    f[k] = Flight(t);
    sub[k] = _mm512_sub_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(f[k].stride)),
                              _mm512_set1_epi32(t.tables->base));
  }
  return by_row_runs(
      tasks, order, n,
      [&](int k, int t0, int t1) KVC_AVX512 {
        return rows_k<LOADS>(k, f, x, sub, t0, t1, channels);
      },
      [&](int i) KVC_AVX512 {
        alignas(64) uint32_t state[LANES];
        _mm512_store_si512(state, x[i]);
        return final_check(state, channels, f[i].pos, f[i].n_words);
      });
}

}  // namespace

void decode_blobs_avx512(BlobTask* tasks, size_t n, bool loads) {
  decode_in_groups(tasks, n, AVX512_INTERLEAVE, MAX_TABLES_TOGETHER,
                   loads ? decode_group<true> : decode_group<false>);
}

#else  // not x86-64 GCC/Clang

bool avx512_available() { return false; }

void decode_blobs_avx512(BlobTask* tasks, size_t n, bool) {
  for (size_t i = 0; i < n; ++i) tasks[i].error = "the AVX-512 decoder is not built for this CPU";
}

#endif

}  // namespace kvc
