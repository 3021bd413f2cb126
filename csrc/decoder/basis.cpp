// A klt stream's inverse transform for the SIMD dequantizer (dequant_avx2.cpp): per head,
// out = sum_j x[j] * basis[j] over the nonzero x[j], ascending, alternately into two sums
// (odd and even terms) of fused multiply-adds, then the two added: the order dequant.h
// fixes for every path, eight (AVX2) or sixteen (AVX-512) channels per instruction. Each
// lane does what the scalar loop in dequant.cpp does for its channel, and a fused
// multiply-add is correctly rounded everywhere, so all paths are bit-identical.
//
// How it is fast (bench_klt.py):
// - A row's nonzero terms are listed first, values and row offsets, without a branch per
//   term (at a few bits per value most are zero, and a branch on each mispredicts).
// - The sums go a block of channels at a time (basis_block), so that they stay in
//   registers (AVX2 has 16: 32 channels, two sums of four; a whole 64-dim head spilled
//   two sums to the stack, and each of their adds then waited on a store). Where a
//   head's basis is too large for the caches near the core (256-dim: 256 KiB, every
//   term of every row reading its 1 KiB row from L2), dequant_avx2.cpp sums a tile of
//   rows block by block, and they read the block's slice (32 KiB) from L1.
// - The term lists are padded with terms of value +0 on a row of -0, which leave any sum
//   as it is (+0 * -0 = -0, and s + -0 = s for every s, -0 included), so the loops run
//   pairs of terms without a tail, and AVX-512 sums two rows in one loop, the shorter
//   padded to the longer: twice the independent adds, half the loop exits (which
//   mispredict).
// - The basis comes as a copy (pad_basis): aligned (a load across two cache lines costs
//   two), in blocks, each with its row of -0.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "decoder/dequant.h"

namespace kvc {

int basis_block(int d, bool avx512) {
  if (avx512 && d <= 128 && d % 64 == 0) return 64;  // 32 KiB of basis at 128
  return d % 32 == 0 ? 32 : 16;
}

void pad_basis(const float* basis, int d, int cb, float* out) {
  for (int b = 0; b < d / cb; ++b) {
    float* block = out + (size_t)b * (d + 1) * cb;
    for (int j = 0; j < d; ++j)
      memcpy(block + (size_t)j * cb, basis + (size_t)j * d + (size_t)b * cb, sizeof(float) * cb);
    for (int i = 0; i < cb; ++i) block[(size_t)d * cb + i] = -0.0f;
  }
}

float* basis_scratch(size_t floats) {
  // Reused: a fresh buffer per head and chunk would fault its pages in each time (a
  // 256-dim head's copy is 257 KiB).
  thread_local std::vector<float> buf;
  if (buf.size() < floats + 16) buf.resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) &
                                  ~static_cast<uintptr_t>(63));
}

}  // namespace kvc

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_AVX2 __attribute__((target("avx2,fma")))
#define KVC_AVX512 __attribute__((target("avx2,fma,avx512f")))

namespace kvc {
namespace {

// The nonzero terms of x (d % 8 == 0): their values into vals and their rows' offsets in
// a block (j * cb) into off, ascending; returns how many, n. The slot after them (if n <
// d) is a pad term (value +0, offset d * cb: the block's row of -0): AVX2 sums one row at
// a time, n rounded up to even. Eight values at a time: a compare gives a mask, a table
// the lanes to keep, a permute moves them down, and the lanes past the count become pads
// (each group's store starts where the last one's terms end).
KVC_AVX2 int terms_avx2(const float* x, int d, int cb, float* vals, int* off) {
  static const auto table = [] {
    struct T { uint8_t v[256][8]; } t{};
    for (int m = 0; m < 256; ++m)
      for (int b = 0, n = 0; b < 8; ++b)
        if (m >> b & 1) t.v[m][n++] = (uint8_t)b;
    return t;
  }();
  const __m256 zero = _mm256_setzero_ps();
  const __m256i pad = _mm256_set1_epi32(d * cb), iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int n = 0;
  for (int g = 0; g < d; g += 8) {
    const __m256 xg = _mm256_loadu_ps(x + g);
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(xg, zero, _CMP_NEQ_UQ));
    const int count = __builtin_popcount((unsigned)m);
    const __m256i at = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(table.v[m])));
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), iota);
    const __m256i rows = _mm256_mullo_epi32(_mm256_add_epi32(at, _mm256_set1_epi32(g)),
                                            _mm256_set1_epi32(cb));
    _mm256_storeu_ps(vals + n, _mm256_and_ps(_mm256_permutevar8x32_ps(xg, at),
                                             _mm256_castsi256_ps(live)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + n), _mm256_blendv_epi8(pad, rows, live));
    n += count;
  }
  if (n < d) vals[n] = 0.0f, off[n] = d * cb;  // the last group's lanes were all terms
  return n;
}

// One head's symbols s dequantized as dequant_avx2.cpp's load_row does them ((s - R) *
// (step * mult), the same operations, sixteen lanes at a time) and listed with AVX-512's
// compress, the values never stored: listing them right after load_row stored them, the
// loads waited on those stores (a sixth of a klt decode's time, 1.08-1.12x faster
// without). The lists are stored whole (a compressing store is slow, and later loads
// cannot take their values from it). Here every slot from n up to d is a pad (two rows
// are summed together, the shorter padded to the longer): they are pads first, and each
// group's store writes pads past its own terms. -1 where a symbol is past 2R.
KVC_AVX512 int load_terms_avx512(const uint8_t* s, const float* mult, float step, int r,
                                 int d, int cb, float* vals, int* off) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i pad = _mm512_set1_epi32(d * cb);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < d; i += 16) {
    _mm512_storeu_ps(vals + i, zero);
    _mm512_storeu_si512(off + i, pad);
  }
  const __m512i top = _mm512_set1_epi32(2 * r), half = _mm512_set1_epi32(r);
  const __m512 st = _mm512_set1_ps(step);
  __mmask16 bad = 0;
  int n = 0;
  for (int g = 0; g < d; g += 16) {
    const __m512i v =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g)));
    bad |= _mm512_cmpgt_epi32_mask(v, top);
    const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(v, half));
    const __m512 xg = _mm512_mul_ps(q, _mm512_mul_ps(st, _mm512_loadu_ps(mult + g)));
    const __mmask16 m = _mm512_cmp_ps_mask(xg, zero, _CMP_NEQ_UQ);
    const __m512i rows = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(g)),
                                            _mm512_set1_epi32(cb));
    _mm512_storeu_ps(vals + n, _mm512_maskz_compress_ps(m, xg));
    _mm512_storeu_si512(off + n, _mm512_mask_compress_epi32(pad, m, rows));
    n += __builtin_popcount((unsigned)m);
  }
  return bad ? -1 : n;
}

// One block (8 * B channels) of one row: n (even) terms, two sums of B registers.
template <int B>
KVC_AVX2 void sum_avx2(const float* vals, const int* off, int n, const float* b, float* out) {
  __m256 s[B], r[B];
  for (int i = 0; i < B; ++i) s[i] = r[i] = _mm256_setzero_ps();
  for (int t = 0; t < n; t += 2) {
    const __m256 u = _mm256_broadcast_ss(vals + t), v = _mm256_broadcast_ss(vals + t + 1);
    const float* p = b + off[t];
    const float* q = b + off[t + 1];
    for (int i = 0; i < B; ++i) {
      s[i] = _mm256_fmadd_ps(u, _mm256_load_ps(p + 8 * i), s[i]);
      r[i] = _mm256_fmadd_ps(v, _mm256_load_ps(q + 8 * i), r[i]);
    }
  }
  for (int i = 0; i < B; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_add_ps(s[i], r[i]));
}

// One block (16 * B channels) of two rows (a and b), n (even) terms of each.
template <int B>
KVC_AVX512 void sum2_avx512(const float* va, const int* oa, const float* vb, const int* ob,
                            int n, const float* b, float* outa, float* outb) {
  __m512 s[B], r[B], s2[B], r2[B];
  for (int i = 0; i < B; ++i) s[i] = r[i] = s2[i] = r2[i] = _mm512_setzero_ps();
  for (int t = 0; t < n; t += 2) {
    const __m512 u = _mm512_set1_ps(va[t]), v = _mm512_set1_ps(va[t + 1]);
    const __m512 u2 = _mm512_set1_ps(vb[t]), v2 = _mm512_set1_ps(vb[t + 1]);
    const float* p = b + oa[t];
    const float* q = b + oa[t + 1];
    const float* p2 = b + ob[t];
    const float* q2 = b + ob[t + 1];
    for (int i = 0; i < B; ++i) {
      s[i] = _mm512_fmadd_ps(u, _mm512_load_ps(p + 16 * i), s[i]);
      r[i] = _mm512_fmadd_ps(v, _mm512_load_ps(q + 16 * i), r[i]);
      s2[i] = _mm512_fmadd_ps(u2, _mm512_load_ps(p2 + 16 * i), s2[i]);
      r2[i] = _mm512_fmadd_ps(v2, _mm512_load_ps(q2 + 16 * i), r2[i]);
    }
  }
  for (int i = 0; i < B; ++i) {
    _mm512_storeu_ps(outa + 16 * i, _mm512_add_ps(s[i], r[i]));
    _mm512_storeu_ps(outb + 16 * i, _mm512_add_ps(s2[i], r2[i]));
  }
}

KVC_AVX2 void sums_avx2(const float* const* vals, const int* const* off, int rows, int n,
                        const float* basis, int d, int cb, int b0, int b1, float* const* out) {
  for (int k = 0; k < rows; ++k)
    for (int b = b0; b < b1; ++b) {
      const float* block = basis + (size_t)b * (d + 1) * cb;
      if (cb == 32) {
        sum_avx2<4>(vals[k], off[k], n, block, out[k] + b * cb);
      } else {
        sum_avx2<2>(vals[k], off[k], n, block, out[k] + b * cb);
      }
    }
}

KVC_AVX512 void sums_avx512(const float* const* vals, const int* const* off, int rows, int n,
                            const float* basis, int d, int cb, int b0, int b1,
                            float* const* out) {
  alignas(64) float spare[256];  // one row: summed twice, the second thrown away
  const int o = rows > 1;
  float* outb = o ? out[1] : spare;
  for (int b = b0; b < b1; ++b) {
    const float* block = basis + (size_t)b * (d + 1) * cb;
    const int c = b * cb;
    if (cb == 64) {
      sum2_avx512<4>(vals[0], off[0], vals[o], off[o], n, block, out[0] + c, outb + c);
    } else if (cb == 32) {
      sum2_avx512<2>(vals[0], off[0], vals[o], off[o], n, block, out[0] + c, outb + c);
    } else {
      sum2_avx512<1>(vals[0], off[0], vals[o], off[o], n, block, out[0] + c, outb + c);
    }
  }
}

}  // namespace

bool basis_simd_ok() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

int basis_terms(const float* x, int d, int cb, float* vals, int* off) {
  return terms_avx2(x, d, cb, vals, off);
}

int basis_load_terms(const uint8_t* s, const float* mult, float step, int r, int d, int cb,
                     float* vals, int* off) {
  return load_terms_avx512(s, mult, step, r, d, cb, vals, off);
}

void basis_sums(const float* const* vals, const int* const* off, int rows, int n,
                const float* basis, int d, int cb, int b0, int b1, float* const* out,
                bool avx512) {
  if (avx512) {
    sums_avx512(vals, off, rows, n, basis, d, cb, b0, b1, out);
  } else {
    sums_avx2(vals, off, rows, n, basis, d, cb, b0, b1, out);
  }
}

}  // namespace kvc

#else

namespace kvc {
bool basis_simd_ok() { return false; }
int basis_terms(const float*, int, int, float*, int*) { return 0; }
int basis_load_terms(const uint8_t*, const float*, float, int, int, int, float*, int*) {
  return 0;
}
void basis_sums(const float* const*, const int* const*, int, int, const float*, int, int, int,
                int, float* const*, bool) {}
}  // namespace kvc

#endif
