// A klt stream's inverse transform for the SIMD dequantizer (dequant_avx2.cpp): per head,
// out = sum_j x[j] * basis[j] over the nonzero x[j], ascending, alternately into two sums
// (odd and even terms) of fused multiply-adds, then the two added: the order dequant.h
// fixes for every path, eight (AVX2) or sixteen (AVX-512) channels per instruction. Each
// lane does what the scalar loop in dequant.cpp does for its channel, and a fused
// multiply-add is correctly rounded everywhere, so all paths are bit-identical. Two sums
// halve the chain of dependent adds. The nonzero terms are listed first (without a
// branch per term: at a few bits per value most are zero, and a branch on each
// mispredicts), then summed. Head dims of 64, 128 and 256 keep the sums in registers;
// other multiples of 16 go through memory.
#include <stddef.h>
#include <stdint.h>

#include "decoder/dequant.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_AVX2 __attribute__((target("avx2,fma")))
#define KVC_AVX512 __attribute__((target("avx2,fma,avx512f")))

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

// The same with AVX-512's compress, in a register and then stored whole (a compressing
// store is slow, and later loads cannot take their values from it); idx: d + 16 slots.
KVC_AVX512 int nonzero_avx512(const float* x, int d, int* idx) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int n = 0;
  for (int g = 0; g < d; g += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + g), zero, _CMP_NEQ_UQ);
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(
                                     m, _mm512_add_epi32(iota, _mm512_set1_epi32(g))));
    n += __builtin_popcount((unsigned)m);
  }
  return n;
}

template <int D>
KVC_AVX2 void basis_avx2_fixed(const float* x, const float* b, float* out) {
  __m256 s[D / 8], r[D / 8];
  int idx[D + 8];
  const int n = nonzero_avx2(x, D, idx);
  for (int i = 0; i < D / 8; ++i) s[i] = r[i] = _mm256_setzero_ps();
  int t = 0;
  for (; t + 1 < n; t += 2) {
    const __m256 u = _mm256_set1_ps(x[idx[t]]), v = _mm256_set1_ps(x[idx[t + 1]]);
    const float* p = b + (size_t)idx[t] * D;
    const float* q = b + (size_t)idx[t + 1] * D;
    for (int i = 0; i < D / 8; ++i) {
      s[i] = _mm256_fmadd_ps(u, _mm256_loadu_ps(p + 8 * i), s[i]);
      r[i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(q + 8 * i), r[i]);
    }
  }
  if (t < n) {
    const __m256 u = _mm256_set1_ps(x[idx[t]]);
    const float* p = b + (size_t)idx[t] * D;
    for (int i = 0; i < D / 8; ++i) s[i] = _mm256_fmadd_ps(u, _mm256_loadu_ps(p + 8 * i), s[i]);
  }
  for (int i = 0; i < D / 8; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_add_ps(s[i], r[i]));
}

KVC_AVX2 void basis_avx2_any(const float* x, const float* b, int d, float* out) {
  alignas(32) float other[256];
  int idx[256 + 8];
  const int n = nonzero_avx2(x, d, idx);
  for (int i = 0; i < d; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_setzero_ps());
    _mm256_store_ps(other + i, _mm256_setzero_ps());
  }
  for (int t = 0; t < n; ++t) {
    float* sum = t & 1 ? other : out;
    const __m256 u = _mm256_set1_ps(x[idx[t]]);
    const float* p = b + (size_t)idx[t] * d;
    for (int i = 0; i < d; i += 8)
      _mm256_storeu_ps(sum + i, _mm256_fmadd_ps(u, _mm256_loadu_ps(p + i),
                                                _mm256_loadu_ps(sum + i)));
  }
  for (int i = 0; i < d; i += 8)
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_load_ps(other + i)));
}

template <int D>
KVC_AVX512 void basis_avx512_fixed(const float* x, const float* b, float* out) {
  __m512 s[D / 16], r[D / 16];
  int idx[D + 16];
  const int n = nonzero_avx512(x, D, idx);
  for (int i = 0; i < D / 16; ++i) s[i] = r[i] = _mm512_setzero_ps();
  int t = 0;
  for (; t + 1 < n; t += 2) {
    const __m512 u = _mm512_set1_ps(x[idx[t]]), v = _mm512_set1_ps(x[idx[t + 1]]);
    const float* p = b + (size_t)idx[t] * D;
    const float* q = b + (size_t)idx[t + 1] * D;
    for (int i = 0; i < D / 16; ++i) {
      s[i] = _mm512_fmadd_ps(u, _mm512_loadu_ps(p + 16 * i), s[i]);
      r[i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(q + 16 * i), r[i]);
    }
  }
  if (t < n) {
    const __m512 u = _mm512_set1_ps(x[idx[t]]);
    const float* p = b + (size_t)idx[t] * D;
    for (int i = 0; i < D / 16; ++i) s[i] = _mm512_fmadd_ps(u, _mm512_loadu_ps(p + 16 * i), s[i]);
  }
  for (int i = 0; i < D / 16; ++i) _mm512_storeu_ps(out + 16 * i, _mm512_add_ps(s[i], r[i]));
}

}  // namespace

bool basis_simd_ok() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

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
bool basis_simd_ok() { return false; }
void basis_simd(const float*, const float*, int, float*, bool) {}
}  // namespace kvc

#endif
