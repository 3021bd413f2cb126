// AVX2 decoder of the interleaved rANS blob (layout in common/rans.h). A blob's 16 lane
// states are two 256-bit registers; a step gathers each lane's bucket entry and range
// entry, advances 8 states at once, and refills the lanes that need a word from the
// shared stream in lane order (a movemask, a popcount and a permutation that spreads the
// next k words over the lanes asking for one, as in ryg's SIMD rANS); a partial last
// group runs the same step on its lanes only. One blob alone is one chain of dependent
// gathers (the bitstream orders every step after the previous one's refills), so up to
// four blobs of the same channels decode together and their steps overlap. A gather is the
// hardware's, or eight scalar loads where the hardware's is slow (gather8).
// Bit-identical to the scalar decoder by construction: the same tables and arithmetic,
// lane by lane. Compiled for AVX2 by function attribute only, so the rest of the library
// stays portable; decode_blobs picks it at run time (CPU feature check).
#include <string.h>

#include <string>

#include "../common/rans.h"
#include "decoder.h"
#include "group.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_HAVE_AVX2_BUILD 1
#define KVC_AVX2 __attribute__((target("avx2,popcnt")))
#endif

namespace kvc {

#ifdef KVC_HAVE_AVX2_BUILD

bool avx2_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

namespace {

// For each 8-bit refill mask: lane i takes word popcount(mask & ((1 << i) - 1)).
struct RefillPerm {
  alignas(32) int32_t idx[256][8];
  RefillPerm() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        idx[m][i] = (m >> i & 1) ? k++ : 0;
      }
    }
  }
};
const RefillPerm kPerm;

// Eight 32-bit table entries: the hardware's gather, or (LOADS) eight scalar loads
// (four_loads), faster where a 256-bit gather is slow (decoder.cpp measures which).
template <bool LOADS>
KVC_AVX2 inline __m256i gather8(const int* base, __m256i idx) {
  if (!LOADS) return _mm256_i32gather_epi32(base, idx, 4);
  const __m128i r0 = four_loads(base, _mm256_castsi256_si128(idx));
  const __m128i r1 = four_loads(base, _mm256_extracti128_si256(idx, 1));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(r0), r1, 1);
}

// A half-group step (8 lanes) in three phases, so that the decoder can issue one phase
// for every state chain in flight before the next (their gathers then overlap):
// lookup8 gathers each lane's bucket entry, index8 turns it into the lane's range index
// within the group, advance8 gathers that range entry and advances the state. Lanes
// outside `active` (all-ones = active) touch no memory and keep their state.
template <bool MASKED, bool LOADS = false>
KVC_AVX2 inline __m256i lookup8(__m256i x, __m256i active, __m256i bucket_off,
                                const uint32_t* gbucket) {
  const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32((int)PROB_MASK));
  const __m256i bidx = _mm256_add_epi32(bucket_off, _mm256_srli_epi32(slot, DecodeTables::SHIFT));
  const int* bt = reinterpret_cast<const int*>(gbucket);
  return MASKED ? _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), bt, bidx, active, 4)
                : gather8<LOADS>(bt, bidx);
}

KVC_AVX2 inline __m256i index8(__m256i x, __m256i e, const uint32_t* grange) {
  const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32((int)PROB_MASK));
  // r = r1 - (split > offset); the multi bit makes the split past every offset.
  const __m256i offset = _mm256_and_si256(x, _mm256_set1_epi32(DecodeTables::SPAN - 1));
  __m256i r = _mm256_add_epi32(_mm256_and_si256(e, _mm256_set1_epi32((int)DecodeTables::R_MASK)),
                               _mm256_cmpgt_epi32(_mm256_srli_epi32(e, 24), offset));
  // `multi` buckets (rare): X within [lo, hi), else a walk back or on (multi_index).
  if (__builtin_expect(_mm256_movemask_ps(_mm256_castsi256_ps(e)) != 0, 0)) {
    const int* rt = reinterpret_cast<const int*>(grange);
    const __m256i one = _mm256_set1_epi32(1), mask6 = _mm256_set1_epi32(63);
    const __m256i multi = _mm256_srai_epi32(e, 31);
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(e, DecodeTables::LO_SHIFT), mask6);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(e, DecodeTables::HI_SHIFT), mask6);
    __m256i back = _mm256_and_si256(multi, _mm256_cmpgt_epi32(lo, offset));
    __m256i on = _mm256_andnot_si256(_mm256_cmpgt_epi32(hi, offset), multi);
    const __m256i x = _mm256_and_si256(e, _mm256_set1_epi32((int)DecodeTables::X_MASK));
    r = _mm256_blendv_epi8(r, _mm256_add_epi32(x, back), multi);  // X - 1 where back
    __m256i go = _mm256_or_si256(back, on);
    while (!_mm256_testz_si256(go, go)) {
      // back lanes read their own cum, on lanes the next one: one gather for both.
      const __m256i c = _mm256_srli_epi32(
          _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), rt,
                                      _mm256_sub_epi32(r, on), go, 4), 16);
      const __m256i above = _mm256_cmpgt_epi32(c, slot);
      on = _mm256_andnot_si256(above, on);   // still at or past the next cum
      back = _mm256_and_si256(above, back);  // still before this cum
      r = _mm256_add_epi32(_mm256_sub_epi32(r, on), back);
      go = _mm256_or_si256(back, on);
    }
  }
  return r;
}

template <bool MASKED, bool LOADS = false>
KVC_AVX2 inline __m256i advance8(__m256i x, __m256i r, __m256i active, const uint32_t* grange) {
  const int* rt = reinterpret_cast<const int*>(grange);
  const __m256i v = MASKED ? _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), rt, r, active, 4)
                           : gather8<LOADS>(rt, r);
  const __m256i freq = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
  const __m256i cum = _mm256_srli_epi32(v, 16);
  const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32((int)PROB_MASK));
  const __m256i y = _mm256_sub_epi32(
      _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(x, PROB_BITS)), slot), cum);
  return MASKED ? _mm256_blendv_epi8(x, y, active) : y;
}

// Refill the lanes of `x` below L (within `active`) from words[*pos ..] in lane order;
// false if the stream runs out.
KVC_AVX2 inline bool refill8(__m256i* x, __m256i active, const uint8_t* words, size_t n_words,
                             size_t* pos) {
  const __m256i need = _mm256_and_si256(
      active, _mm256_cmpeq_epi32(_mm256_srli_epi32(*x, 16), _mm256_setzero_si256()));
  // No branch on whether any lane needs a word: that is close to a coin toss per step
  // (a lane needs one every ~6 symbols at 2.5 bits), and a blend of nothing is cheap.
  const int m = _mm256_movemask_ps(_mm256_castsi256_ps(need));
  const int k = __builtin_popcount((unsigned)m);
  __m256i w;
  if (__builtin_expect(*pos + 8 <= n_words, 1)) {
    w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 2 * *pos)));
  } else {  // near the end: no 16-byte load past the stream
    if (*pos + k > n_words) return false;
    alignas(16) uint16_t tail[8] = {0};
    memcpy(tail, words + 2 * *pos, 2 * k);
    w = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
  }
  w = _mm256_permutevar8x32_epi32(
      w, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[m])));
  const __m256i refilled = _mm256_or_si256(_mm256_slli_epi32(*x, 16), w);
  *x = _mm256_blendv_epi8(*x, refilled, need);
  *pos += k;
  return true;
}

// 16 symbols from their range indices (less lane * stride - base: sub0, sub1) to bytes in
// lane order.
KVC_AVX2 inline __m128i pack16(__m256i r0, __m256i r1, __m256i sub0, __m256i sub1) {
  __m256i p = _mm256_packus_epi32(_mm256_sub_epi32(r0, sub0), _mm256_sub_epi32(r1, sub1));
  p = _mm256_permute4x64_epi64(p, 0xD8);
  return _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
}

// Rows [t0, t1) of K blobs (of the same channels) in flight together: chain c = 2k + h
// is half h of blob k's lane states (xs, kept by decode_group between runs of rows). The
// chains are independent, and each phase of a step is issued for all 2K of them before
// the next phase, so their gathers overlap (one blob alone is one latency-bound chain of
// dependent gathers, by the bitstream's design). Returns null, or an error that some
// blob has (the caller then decodes them one by one to say which).
template <int K, bool LOADS>
KVC_AVX2 const char* decode_rows(Flight* flights, __m256i* xs, const __m256i* subs, int t0,
                                 int t1, int channels) {
  constexpr int C = 2 * K;
  const int full = channels / LANES, rest = channels - full * LANES;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i all = _mm256_set1_epi32(-1);
  __m256i boff[2];  // lane * BUCKETS: each lane's bucket row within a group
  boff[0] = _mm256_mullo_epi32(lane, _mm256_set1_epi32(DecodeTables::BUCKETS));
  boff[1] = _mm256_add_epi32(boff[0], _mm256_set1_epi32(8 * DecodeTables::BUCKETS));
  // The partial last group's lanes: [0, rest).
  __m256i act[2];
  act[0] = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), lane);
  act[1] = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest - 8), lane);
  // Local copies: what the loop updates stays in registers (the output stores, bytes,
  // could alias the caller's arrays).
  Flight f[K];
  __m256i x[C], sub[C];  // sub: lane * stride - base, from a range index to the symbol
  for (int k = 0; k < K; ++k) f[k] = flights[k];
  for (int c = 0; c < C; ++c) x[c] = xs[c], sub[c] = subs[c];
  for (int t = t0; t < t1; ++t) {
    const size_t row = (size_t)t * channels;
    for (int g = 0; g < full; ++g) {
      const size_t first = (size_t)g * LANES;
      __m256i e[C], s[C];
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        e[c] = lookup8<false, LOADS>(x[c], all, boff[c & 1],
                              f[c / 2].bucket + first * DecodeTables::BUCKETS);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        s[c] = index8(x[c], e[c], f[c / 2].range + first * f[c / 2].stride);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c)
        x[c] = advance8<false, LOADS>(x[c], s[c], all, f[c / 2].range + first * f[c / 2].stride);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(f[k].out + row + first),
                         pack16(s[2 * k], s[2 * k + 1], sub[2 * k], sub[2 * k + 1]));
        if (!refill8(&x[2 * k], all, f[k].words, f[k].n_words, &f[k].pos) ||
            !refill8(&x[2 * k + 1], all, f[k].words, f[k].n_words, &f[k].pos))
          return "truncated word stream";
      }
    }
    if (rest && rest <= SCALAR_REST) {  // a few lanes of a partial group: scalar steps
      const int first = full * LANES;
      for (int k = 0; k < K; ++k) {
        // Lane moves, not a store and a reload: a vector load of scalar stores stalls.
        const __m128i lo = _mm256_castsi256_si128(x[2 * k]);
        uint32_t state[4] = {
            (uint32_t)_mm_cvtsi128_si32(lo), (uint32_t)_mm_extract_epi32(lo, 1),
            (uint32_t)_mm_extract_epi32(lo, 2), (uint32_t)_mm_extract_epi32(lo, 3)};
        if (!f[k].scalar_step(state, rest, first, row)) return "truncated word stream";
        x[2 * k] = _mm256_blend_epi32(
            x[2 * k], _mm256_castsi128_si256(_mm_setr_epi32((int)state[0], (int)state[1],
                                                            (int)state[2], (int)state[3])), 0x0f);
      }
    } else if (rest) {  // the partial last group: the same step on its lanes only
      const size_t first = (size_t)full * LANES;
      for (int k = 0; k < K; ++k) {
        const uint32_t* gb = f[k].bucket + first * DecodeTables::BUCKETS;
        const uint32_t* gr = f[k].range + first * f[k].stride;
        __m256i sym[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int h = 0; h < (rest > 8 ? 2 : 1); ++h) {
          __m256i& xc = x[2 * k + h];
          sym[h] = index8(xc, lookup8<true>(xc, act[h], boff[h], gb), gr);
          xc = advance8<true>(xc, sym[h], act[h], gr);
        }
        alignas(16) uint8_t bytes[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(bytes),
                        pack16(sym[0], sym[1], sub[2 * k], sub[2 * k + 1]));
        memcpy(f[k].out + row + first, bytes, rest);
        if (!refill8(&x[2 * k], act[0], f[k].words, f[k].n_words, &f[k].pos) ||
            (rest > 8 && !refill8(&x[2 * k + 1], act[1], f[k].words, f[k].n_words, &f[k].pos)))
          return "truncated word stream";
      }
    }
  }
  for (int k = 0; k < K; ++k) flights[k].pos = f[k].pos;
  for (int c = 0; c < C; ++c) xs[c] = x[c];
  return nullptr;
}

template <bool LOADS>
KVC_AVX2 const char* rows_k(int k, Flight* f, __m256i* x, const __m256i* sub, int t0, int t1,
                            int channels) {
  switch (k) {
    case 4: return decode_rows<4, LOADS>(f, x, sub, t0, t1, channels);
    case 3: return decode_rows<3, LOADS>(f, x, sub, t0, t1, channels);
    case 2: return decode_rows<2, LOADS>(f, x, sub, t0, t1, channels);
    default: return decode_rows<1, LOADS>(f, x, sub, t0, t1, channels);
  }
}

// Up to AVX2_INTERLEAVE blobs of the same channels decoded together: all of them over
// the rows every one has, then those with more rows on (decode_in_groups).
template <bool LOADS>
KVC_AVX2 const char* decode_group(const BlobTask* tasks, int n) {
  const int channels = tasks[0].channels;
  int order[AVX2_INTERLEAVE];
  longest_first(tasks, n, order);
  Flight f[AVX2_INTERLEAVE];
  __m256i x[2 * AVX2_INTERLEAVE], sub[2 * AVX2_INTERLEAVE];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int k = 0; k < n; ++k) {
    const BlobTask& t = tasks[order[k]];
    alignas(32) uint32_t state[LANES];
    if (const char* err = load_states(t.data, t.size, channels, state)) return err;
    x[2 * k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(state));
    x[2 * k + 1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(state + 8));
    f[k] = Flight(t);
    sub[2 * k] = _mm256_sub_epi32(_mm256_mullo_epi32(lane, _mm256_set1_epi32(f[k].stride)),
                                  _mm256_set1_epi32(t.tables->base));
    sub[2 * k + 1] = _mm256_add_epi32(sub[2 * k], _mm256_set1_epi32(8 * f[k].stride));
  }
  return by_row_runs(
      tasks, order, n,
      [&](int k, int t0, int t1) KVC_AVX2 {
        return rows_k<LOADS>(k, f, x, sub, t0, t1, channels);
      },
      [&](int i) KVC_AVX2 {
        alignas(32) uint32_t state[LANES];
        _mm256_store_si256(reinterpret_cast<__m256i*>(state), x[2 * i]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(state + 8), x[2 * i + 1]);
        return final_check(state, channels, f[i].pos, f[i].n_words);
      });
}

}  // namespace

void decode_blobs_avx2(BlobTask* tasks, size_t n, bool loads) {
  decode_in_groups(tasks, n, AVX2_INTERLEAVE, MAX_TABLES_TOGETHER,
                   loads ? decode_group<true> : decode_group<false>);
}

#else  // not x86-64 GCC/Clang: the scalar path only

bool avx2_available() { return false; }

void decode_blobs_avx2(BlobTask* tasks, size_t n, bool) {
  for (size_t i = 0; i < n; ++i) tasks[i].error = "the AVX2 decoder is not built for this CPU";
}

#endif

}  // namespace kvc
