#include "decoder/dequant.h"

#include <string.h>

#include <cmath>

#include <vector>

#include "decoder/decoder.h"

namespace kvc {

void dequant_token_scalar(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                          int* bad_row) {
  const int h = spec.heads, d = spec.head_dim, c = h * d, half = d / 2;
  const size_t stride = (size_t)c + 1;
  const uint8_t top = (uint8_t)(2 * spec.half_range);
  std::vector<float> x(d), acc(spec.basis ? 2 * d : 0), res(d);
  // The AVX2 kernel's sums (the scalar loop's, 8 channels at a time) where the CPU has
  // FMA: on each head's padded copy.
  const bool simd = spec.basis && d % 16 == 0 && d <= 256 && basis_simd_ok();
  const int cb = basis_block(d, false);
  const size_t padded = (size_t)(d + 1) * d;
  float* bases = simd ? basis_scratch(padded * h) : nullptr;
  std::vector<int> offs(simd ? d : 0);
  for (int k = 0; simd && k < h; ++k)
    pad_basis(spec.basis + (size_t)k * d * d, d, cb, bases + k * padded);
  *bad_row = -1;
  SinkWalk sink(spec, row0);
  for (int t = 0; t < rows; ++t, sink.next()) {
    const uint8_t* row = symbols + (size_t)t * stride;
    const size_t at = (size_t)(row0 + t) * d;  // this row in out's heads and in cos/sin
    const float step = spec.grid[row[c]];
    const float* add_row = spec.add && spec.add_rows
                               ? spec.add + (size_t)((row0 + t) / spec.add_rows) * c
                               : spec.add;
    for (int k = 0; k < h; ++k) {
      const uint8_t* s = row + (size_t)k * d;
      const float* m = spec.mult + (size_t)k * d;
      const float* a = add_row ? add_row + (size_t)k * d : nullptr;
      const bool keep = row_kept(spec, row0 + t), dense = keep && dense_out(spec);
      const size_t off = keep ? out_offset(spec, k, row0 + t) : 0;
      // bf16, spread or not stored: made in res (stored from it below)
      float* o = spec.out && dense ? spec.out + off : res.data();
      uint8_t bad = 0;
      for (int i = 0; i < d; ++i) {
        bad |= (uint8_t)(s[i] > top);
        x[i] = (float)((int)s[i] - spec.half_range) * (step * m[i]);
      }
      if (bad) {
        *bad_row = t;
        return;
      }
      if (simd) {
        float* vals = acc.data() + d;  // the terms, after the d sums
        const int n = (basis_terms(x.data(), d, cb, vals, offs.data()) + 1) & ~1;
        const float* v = vals;
        const int* o = offs.data();
        float* sums = acc.data();
        basis_sums(&v, &o, 1, n, bases + k * padded, d, cb, 0, d / cb, &sums, false);
        for (int i = 0; i < d; ++i) x[i] = acc[i];
      } else if (spec.basis) {  // the order every path sums in: see dequant.h
        const float* b = spec.basis + (size_t)k * d * d;
        for (int i = 0; i < 2 * d; ++i) acc[i] = 0.0f;
        int n = 0;
        for (int j = 0; j < d; ++j) {
          const float xj = x[j];
          if (xj == 0.0f) continue;
          float* sum = acc.data() + (n++ & 1) * d;
          const float* row = b + (size_t)j * d;
          for (int i = 0; i < d; ++i) sum[i] = std::fmaf(xj, row[i], sum[i]);
        }
        for (int i = 0; i < d; ++i) x[i] = acc[i] + acc[d + i];
      }
      if (const float* kept = sink.at()) {  // a sink row: its exact values, no means
        for (int i = 0; i < d; ++i) x[i] = kept[(size_t)k * d + i];
      } else if (a) {
        for (int i = 0; i < d; ++i) x[i] = x[i] + a[i];
      }
      if (!spec.cos) {
        for (int i = 0; i < d; ++i) o[i] = x[i];
      } else {
        const float* cs = spec.cos + at;
        const float* sn = spec.sin + at;
        for (int i = 0; i < half; ++i) {
          const float a = x[i] * cs[i], b = -x[i + half] * sn[i];
          o[i] = a + b;
        }
        for (int i = half; i < d; ++i) {
          const float a = x[i] * cs[i], b = x[i - half] * sn[i];
          o[i] = a + b;
        }
      }
      if (!keep) continue;
      if (!dense) {
        store_spread(o, spec, off);
      } else if (!spec.out) {
        for (int i = 0; i < d; ++i) spec.out_bf16[off + i] = to_bf16(o[i]);
      }
    }
  }
}

std::string dequant_token(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0) {
  int bad = -1;
  // The SIMD decode paths (avx2, avx512) both run the AVX2 dequantizer.
  if (!(strcmp(simd_path(), "scalar") != 0 && dequant_token_avx2(symbols, rows, spec, row0, &bad)))
    dequant_token_scalar(symbols, rows, spec, row0, &bad);
  if (bad < 0) return {};
  return "token " + std::to_string(row0 + bad) + " decodes to a symbol outside the quantizer's "
         "range; the header does not match the data";
}

}  // namespace kvc
