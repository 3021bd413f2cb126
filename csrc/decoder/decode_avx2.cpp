// AVX2 decoder of the interleaved rANS blob (layout in common/rans.h): a group's 16 lane
// states are two 256-bit registers; a step gathers each lane's bucket and range entries,
// advances all 16 states at once, and refills the lanes that need a word from the shared
// stream in lane order (a movemask, a popcount and a permutation that spreads the next
// k words over the lanes asking for one, as in ryg's SIMD rANS). Bit-identical to the
// scalar decoder by construction: the same tables and arithmetic, lane by lane, and
// groups of fewer than 16 lanes take the scalar step. Compiled for AVX2 by function
// attribute only, so the rest of the library stays portable; decode_blob picks it at run
// time (CPU feature check).
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

// Decode one half-group (8 lanes) symbol step: returns the new states, sets the symbols.
KVC_AVX2 inline __m256i step8(__m256i x, __m256i bucket_off, __m256i range_off,
                              const uint8_t* gbucket, const uint32_t* grange, __m256i* sym) {
  const __m256i mask12 = _mm256_set1_epi32((int)PROB_MASK);
  const __m256i ff = _mm256_set1_epi32(0xff);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i slot = _mm256_and_si256(x, mask12);
  constexpr int shift = PROB_BITS - DecodeTables::BUCKET_BITS;
  const __m256i bidx = _mm256_add_epi32(bucket_off, _mm256_srli_epi32(slot, shift));
  __m256i s = _mm256_and_si256(
      _mm256_i32gather_epi32(reinterpret_cast<const int*>(gbucket), bidx, 1), ff);
  // Step forward while the slot lies at or past the next symbol's cum (rarely taken).
  for (;;) {
    const __m256i next = _mm256_srli_epi32(
        _mm256_i32gather_epi32(reinterpret_cast<const int*>(grange),
                               _mm256_add_epi32(range_off, _mm256_add_epi32(s, one)), 4), 16);
    const __m256i past = _mm256_xor_si256(_mm256_cmpgt_epi32(next, slot),
                                          _mm256_set1_epi32(-1));  // slot >= next
    if (_mm256_testz_si256(past, past)) break;
    s = _mm256_sub_epi32(s, past);  // +1 where past (all-ones = -1)
  }
  const __m256i r = _mm256_i32gather_epi32(reinterpret_cast<const int*>(grange),
                                           _mm256_add_epi32(range_off, s), 4);
  const __m256i freq = _mm256_and_si256(r, _mm256_set1_epi32(0xffff));
  const __m256i cum = _mm256_srli_epi32(r, 16);
  *sym = s;
  return _mm256_sub_epi32(
      _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(x, PROB_BITS)), slot), cum);
}

// Refill the lanes of `x` below L from words[*pos ..] in lane order; false if the stream
// runs out.
KVC_AVX2 inline bool refill8(__m256i* x, const uint8_t* words, size_t n_words, size_t* pos) {
  const __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(*x, 16), _mm256_setzero_si256());
  const int m = _mm256_movemask_ps(_mm256_castsi256_ps(need));
  if (!m) return true;
  const int k = __builtin_popcount((unsigned)m);
  if (*pos + k > n_words) return false;
  __m256i w;
  if (*pos + 8 <= n_words) {
    w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 2 * *pos)));
  } else {  // near the end: no 16-byte load past the stream
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

}  // namespace

KVC_AVX2 std::string decode_blob_avx2(const uint8_t* blob, size_t size, int rows, int channels,
                                      const DecodeTables& tables, uint8_t* out) {
  uint32_t state[LANES];
  if (const char* err = load_states(blob, size, channels, state)) return err;
  const uint8_t* words = blob + STATE_BYTES;
  const size_t n_words = (size - STATE_BYTES) / 2;
  size_t pos = 0;
  const int groups = (channels + LANES - 1) / LANES;
  const int full = channels / LANES;  // groups of 16 lanes; the last may be partial
  const int stride = tables.stride;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i boff0 = _mm256_mullo_epi32(lane, _mm256_set1_epi32(DecodeTables::BUCKETS));
  const __m256i boff1 = _mm256_add_epi32(boff0, _mm256_set1_epi32(8 * DecodeTables::BUCKETS));
  const __m256i roff0 = _mm256_mullo_epi32(lane, _mm256_set1_epi32(stride));
  const __m256i roff1 = _mm256_add_epi32(roff0, _mm256_set1_epi32(8 * stride));
  const __m256i base = _mm256_set1_epi32(tables.base);
  __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state));
  __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state + 8));
  for (int t = 0; t < rows; ++t) {
    uint8_t* row = out + (size_t)t * channels;
    for (int g = 0; g < full; ++g) {
      const int first = g * LANES;
      const uint8_t* gbucket = tables.bucket.data() + (size_t)first * DecodeTables::BUCKETS;
      const uint32_t* grange = tables.range.data() + (size_t)first * stride;
      __m256i s0, s1;
      x0 = step8(x0, boff0, roff0, gbucket, grange, &s0);
      x1 = step8(x1, boff1, roff1, gbucket, grange, &s1);
      // 16 symbols (< 256 after adding base) to bytes, in lane order.
      __m256i p = _mm256_packus_epi32(_mm256_add_epi32(s0, base), _mm256_add_epi32(s1, base));
      p = _mm256_permute4x64_epi64(p, 0xD8);
      const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(p),
                                         _mm256_extracti128_si256(p, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + first), b);
      if (!refill8(&x0, words, n_words, &pos) || !refill8(&x1, words, n_words, &pos))
        return "truncated word stream";
    }
    if (full < groups) {  // a partial last group: the scalar step on the same states
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(state), x0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(state + 8), x1);
      if (!scalar_group(state, channels - full * LANES, full * LANES, tables, row, words,
                        n_words, &pos))
        return "truncated word stream";
      x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state));
      x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state + 8));
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(state), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(state + 8), x1);
  const char* err = final_check(state, channels, pos, n_words);
  return err ? err : std::string();
}

#else  // not x86-64 GCC/Clang: the scalar path only

bool avx2_available() { return false; }

std::string decode_blob_avx2(const uint8_t*, size_t, int, int, const DecodeTables&, uint8_t*) {
  return "the AVX2 decoder is not built for this CPU";
}

#endif

}  // namespace kvc
