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

KVC_AVX2 bool dequant_token_avx2(const uint8_t* symbols, int rows, const DequantSpec& spec,
                                 int row0, int* bad_row) {
  const int h = spec.heads, d = spec.head_dim, c = h * d, half = d / 2;
  if (d % 16) return false;
  const size_t stride = (size_t)c + 1;
  const __m256i top = _mm256_set1_epi32(2 * spec.half_range);
  const __m256i r = _mm256_set1_epi32(spec.half_range);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  alignas(32) float x[256];  // one head's values (head_dim <= 256 here; else scalar)
  alignas(32) float y[256];  // and, for a klt stream, their inverse transform
  if (d > 256 || (spec.basis && !basis_simd_ok())) return false;
  const bool wide = strcmp(simd_path(), "avx512") == 0;
  *bad_row = -1;
  for (int t = 0; t < rows; ++t) {
    const uint8_t* row = symbols + (size_t)t * stride;
    const size_t at = (size_t)(row0 + t) * d;
    const __m256 step = _mm256_set1_ps(spec.grid[row[c]]);
    const float* add_row = spec.add && spec.add_rows
                               ? spec.add + (size_t)((row0 + t) / spec.add_rows) * c
                               : spec.add;
    for (int k = 0; k < h; ++k) {
      const uint8_t* s = row + (size_t)k * d;
      const float* m = spec.mult + (size_t)k * d;
      const float* a = add_row ? add_row + (size_t)k * d : nullptr;
      float* o = spec.out + (size_t)k * spec.head_stride + at;
      __m256i bad = _mm256_setzero_si256();
      for (int i = 0; i < d; i += 8) {
        const __m256i v =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(v, top));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, r));
        _mm256_store_ps(x + i, _mm256_mul_ps(q, _mm256_mul_ps(step, _mm256_loadu_ps(m + i))));
      }
      if (!_mm256_testz_si256(bad, bad)) {
        *bad_row = t;
        return true;
      }
      if (spec.basis) {
        basis_simd(x, spec.basis + (size_t)k * d * d, d, y, wide);
        for (int i = 0; i < d; i += 8) _mm256_store_ps(x + i, _mm256_load_ps(y + i));
      }
      if (a)
        for (int i = 0; i < d; i += 8)
          _mm256_store_ps(x + i, _mm256_add_ps(_mm256_load_ps(x + i), _mm256_loadu_ps(a + i)));
      if (!spec.cos) {
        for (int i = 0; i < d; i += 8) _mm256_storeu_ps(o + i, _mm256_load_ps(x + i));
        continue;
      }
      const float* cs = spec.cos + at;
      const float* sn = spec.sin + at;
      for (int i = 0; i < half; i += 8) {  // x * cos + (-x[i + half]) * sin
        const __m256 a = _mm256_mul_ps(_mm256_load_ps(x + i), _mm256_loadu_ps(cs + i));
        const __m256 b = _mm256_mul_ps(_mm256_xor_ps(_mm256_load_ps(x + i + half), sign),
                                       _mm256_loadu_ps(sn + i));
        _mm256_storeu_ps(o + i, _mm256_add_ps(a, b));
      }
      for (int i = half; i < d; i += 8) {  // x * cos + x[i - half] * sin
        const __m256 a = _mm256_mul_ps(_mm256_load_ps(x + i), _mm256_loadu_ps(cs + i));
        const __m256 b = _mm256_mul_ps(_mm256_load_ps(x + i - half), _mm256_loadu_ps(sn + i));
        _mm256_storeu_ps(o + i, _mm256_add_ps(a, b));
      }
    }
  }
  return true;
}

}  // namespace kvc

#else

namespace kvc {
bool dequant_token_avx2(const uint8_t*, int, const DequantSpec&, int, int*) { return false; }
}  // namespace kvc

#endif
