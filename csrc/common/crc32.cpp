// CRC-32 (the reflected polynomial 0x04C11DB7, zlib's), by folding: 64 bytes at a time
// are carried forward as four 128-bit remainders, each multiplied (carry-less) by x^(512
// + 32) and x^(512 - 32) mod P and added to the next 64 bytes, then folded into one
// 128-bit remainder, then to 64 and 32 bits, the last step a Barrett reduction (the
// method of Gopal et al., "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
// Instruction", Intel, 2009). The constants are computed from the polynomial below. A
// byte-wise table does the short inputs, the tail, and CPUs without the instruction.
#include "common/crc32.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVC_CLMUL 1
#endif

namespace kvc {
namespace {

constexpr uint64_t POLY = 0x104C11DB7ull;  // x^32 + x^26 + ... + 1, most significant first

// x^n mod P, most significant first.
constexpr uint64_t xpow_mod(int n) {
  uint64_t r = 1;
  for (int i = 0; i < n; ++i) {
    r <<= 1;
    if (r >> 32) r ^= POLY;
  }
  return r;
}

// The low `bits` bits of v in reverse order (the reflected domain the checksum lives in).
constexpr uint64_t reflect(uint64_t v, int bits) {
  uint64_t r = 0;
  for (int i = 0; i < bits; ++i) r |= ((v >> i) & 1) << (bits - 1 - i);
  return r;
}

// A folding constant: x^n mod P, reflected, as the 33-bit multiplier it is used as.
constexpr uint64_t fold(int n) { return reflect(xpow_mod(n), 32) << 1; }

// floor(x^64 / P), reflected over 33 bits: the Barrett reduction's multiplier.
constexpr uint64_t barrett_mu() {
  uint64_t q = 0, num_hi = 1;  // x^64 as (num_hi << 32) | 0, reduced from the top
  uint64_t rem = 0;
  for (int i = 64; i >= 32; --i) {  // long division, one quotient bit per step
    const uint64_t bit = i == 64 ? num_hi : (rem >> 32) & 1;
    if (i < 64) rem &= 0xFFFFFFFFull;
    if (bit) {
      q |= 1ull << (i - 32);
      rem ^= POLY & 0xFFFFFFFFull;  // x^32 cancels the leading term
    }
    rem <<= 1;
  }
  return reflect(q, 33);
}

struct Table {
  uint32_t v[256];
};

constexpr Table make_table() {
  Table t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    t.v[i] = c;
  }
  return t;
}

constexpr Table TABLE = make_table();

uint32_t bytewise(uint32_t c, const uint8_t* p, size_t n) {  // c: the inverted state
  for (size_t i = 0; i < n; ++i) c = TABLE.v[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c;
}

#ifdef KVC_CLMUL
#define KVC_PCLMUL __attribute__((target("pclmul,sse4.1")))

KVC_PCLMUL inline __m128i fold16(__m128i x, __m128i k, __m128i next) {
  const __m128i lo = _mm_clmulepi64_si128(x, k, 0x00), hi = _mm_clmulepi64_si128(x, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

// n >= 64, n % 16 == 0; c: the inverted state, returned likewise.
KVC_PCLMUL uint32_t folded(uint32_t c, const uint8_t* p, size_t n) {
  alignas(16) static const uint64_t k4x[2] = {fold(4 * 128 + 32), fold(4 * 128 - 32)};
  alignas(16) static const uint64_t k1x[2] = {fold(128 + 32), fold(128 - 32)};
  alignas(16) static const uint64_t k64[2] = {fold(64), 0};
  alignas(16) static const uint64_t pmu[2] = {reflect(POLY, 33), barrett_mu()};
  auto load = [](const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); };
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128((int)c));
  __m128i x1 = load(p + 16), x2 = load(p + 32), x3 = load(p + 48);
  __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(k4x));
  for (p += 64, n -= 64; n >= 64; p += 64, n -= 64) {
    x0 = fold16(x0, k, load(p));
    x1 = fold16(x1, k, load(p + 16));
    x2 = fold16(x2, k, load(p + 32));
    x3 = fold16(x3, k, load(p + 48));
  }
  k = _mm_load_si128(reinterpret_cast<const __m128i*>(k1x));
  x0 = fold16(fold16(fold16(x0, k, x1), k, x2), k, x3);
  for (; n >= 16; p += 16, n -= 16) x0 = fold16(x0, k, load(p));
  // 128 -> 64 bits, then the Barrett reduction to 32.
  const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
  x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), _mm_clmulepi64_si128(x0, k, 0x10));
  const __m128i shifted = _mm_srli_si128(x0, 4);
  x0 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x0, low32),
                                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k64)),
                                          0x00),
                     shifted);
  const __m128i pm = _mm_load_si128(reinterpret_cast<const __m128i*>(pmu));
  __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x0, low32), pm, 0x10);
  t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), pm, 0x00);
  return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x0, t), 1);
}

bool has_clmul() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  }();
  return ok;
}
#endif

}  // namespace

uint32_t crc32(uint32_t crc, const uint8_t* data, size_t n) {
  uint32_t c = ~crc;
#ifdef KVC_CLMUL
  if (n >= 64 && has_clmul()) {
    const size_t body = n & ~(size_t)15;
    c = folded(c, data, body);
    data += body, n -= body;
  }
#endif
  return ~bytewise(c, data, n);
}

}  // namespace kvc
