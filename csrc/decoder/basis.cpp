// A klt stream's inverse transform for the SIMD dequantizer (dequant_avx2.cpp): per head,
// acc = sum_j x[j] * basis[j] over j ascending from +0, zero terms skipped, each product
// rounded and then added (no FMA), eight (AVX2) or sixteen (AVX-512) channels per
// instruction. Every lane does what the scalar loop in dequant.cpp does for its channel,
// in the same order, so all three are bit-identical. The nonzero terms are listed first
// (without a branch per term: at a few bits per value most of them are zero, and a
// branch on each mispredicts), then summed. Head dims of 64, 128 and 256 keep the sums
// in registers; others of a multiple of 16 go through memory.
#include <stddef.h>
#include <stdint.h>

#include "decoder/dequant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_AVX2 __attribute__((target("avx2")))
#define KVC_AVX512 __attribute__((target("avx2,avx512f")))

namespace kvc {
namespace {

// The indices of x's nonzero values, ascending (idx has room for d + 8); returns how
// many. Eight values at a time: a compare gives a mask, a table its indices, stored
// whole (the slots past the count are scratch).
KVC_AVX2 int nonzero_avx2(const float* x, int d, int* idx) {
  static const auto table = [] {
    struct T { uint8_t v[256][8]; } t{};
    for (int m = 0; m < 256; ++m)
      for (int b = 0, n = 0; b < 8; ++b)
        if (m >> b & 1) t.v[m][n++] = (uint8_t)b;
    return t;
  }();
  const __m256 zero = _mm256_setzero_ps();
  int n = 0;
  for (int g = 0; g < d; g += 8) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + g), zero, _CMP_NEQ_UQ));
    const __m256i at = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(table.v[m])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + n),
                        _mm256_add_epi32(at, _mm256_set1_epi32(g)));
    n += __builtin_popcount((unsigned)m);
  }
  return n;
}

// The same with AVX-512's compress (sixteen at a time, only the count stored).
KVC_AVX512 int nonzero_avx512(const float* x, int d, int* idx) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int n = 0;
  for (int g = 0; g < d; g += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + g), zero, _CMP_NEQ_UQ);
    _mm512_mask_compressstoreu_epi32(idx + n, m, _mm512_add_epi32(iota, _mm512_set1_epi32(g)));
    n += __builtin_popcount((unsigned)m);
  }
  return n;
}

template <int D>
KVC_AVX2 void basis_avx2_fixed(const float* x, const float* b, float* out) {
  __m256 s[D / 8];
  int idx[D + 8];
  const int n = nonzero_avx2(x, D, idx);
  for (int i = 0; i < D / 8; ++i) s[i] = _mm256_setzero_ps();
  for (int t = 0; t < n; ++t) {
    const int j = idx[t];
    const __m256 v = _mm256_set1_ps(x[j]);
    const float* row = b + (size_t)j * D;
    for (int i = 0; i < D / 8; ++i)
      s[i] = _mm256_add_ps(s[i], _mm256_mul_ps(v, _mm256_loadu_ps(row + 8 * i)));
  }
  for (int i = 0; i < D / 8; ++i) _mm256_storeu_ps(out + 8 * i, s[i]);
}

KVC_AVX2 void basis_avx2_any(const float* x, const float* b, int d, float* out) {
  int idx[256 + 8];
  const int n = nonzero_avx2(x, d, idx);
  for (int i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_setzero_ps());
  for (int t = 0; t < n; ++t) {
    const int j = idx[t];
    const __m256 v = _mm256_set1_ps(x[j]);
    const float* row = b + (size_t)j * d;
    for (int i = 0; i < d; i += 8)
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i),
                                              _mm256_mul_ps(v, _mm256_loadu_ps(row + i))));
  }
}

template <int D>
KVC_AVX512 void basis_avx512_fixed(const float* x, const float* b, float* out) {
  __m512 s[D / 16];
  int idx[D];
  const int n = nonzero_avx512(x, D, idx);
  for (int i = 0; i < D / 16; ++i) s[i] = _mm512_setzero_ps();
  for (int t = 0; t < n; ++t) {
    const int j = idx[t];
    const __m512 v = _mm512_set1_ps(x[j]);
    const float* row = b + (size_t)j * D;
    for (int i = 0; i < D / 16; ++i)
      s[i] = _mm512_add_ps(s[i], _mm512_mul_ps(v, _mm512_loadu_ps(row + 16 * i)));
  }
  for (int i = 0; i < D / 16; ++i) _mm512_storeu_ps(out + 16 * i, s[i]);
}

}  // namespace

void basis_simd(const float* x, const float* basis, int d, float* out, bool avx512) {
  if (avx512) {
    switch (d) {
      case 64: return basis_avx512_fixed<64>(x, basis, out);
      case 128: return basis_avx512_fixed<128>(x, basis, out);
      case 256: return basis_avx512_fixed<256>(x, basis, out);
      default: break;
    }
  }
  switch (d) {
    case 64: return basis_avx2_fixed<64>(x, basis, out);
    case 128: return basis_avx2_fixed<128>(x, basis, out);
    default: return basis_avx2_any(x, basis, d, out);
  }
}

}  // namespace kvc

#else

namespace kvc {
void basis_simd(const float*, const float*, int, float*, bool) {}
}  // namespace kvc

#endif
