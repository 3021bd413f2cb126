// Symbols -> float32 cache layout for the per-token-step uniform quantizer, fused with
// RoPE re-application, so a decoded stream goes from bytes to the [heads, tokens,
// head_dim] tensor attention reads in one pass that stays in cache.
#pragma once
#include <stdint.h>

#include <string>

namespace kvc {

struct DequantSpec {
  const float* grid;     // [256]: step of each per-token step code (codec.quant.STEP_GRID)
  const float* mult;     // [channels]: per-channel step multiplier (head_scale, fitted scale)
  const float* add;      // [channels] or null: per-channel offset added after the step
                         // (the fitted mean of a centered stream), before RoPE; with
                         // add_rows, one such row per add_rows rows (files decoded as one
                         // stream, each centered on its own mean)
  int add_rows;          // 0: one row of offsets for every row
  int half_range;        // R: symbol s means (s - R) * step
  int heads, head_dim;   // channels = heads * head_dim
  const float* cos;      // [rows, head_dim] or null: re-apply rotate_half RoPE
  const float* sin;
  float* out;            // [heads, rows, head_dim] float32, channels contiguous; or null
  uint16_t* out_bf16;    // with out null: the same as bfloat16, each value rounded to
                         // nearest even as PyTorch casts float32 (NaN: 0x7FC0)
  size_t head_stride;    // elements from one head to the next in the output, and
  size_t row_stride;     // from one row to the next (0: head_dim), so a decode can land
                         // in a slice of a larger cache buffer, [heads, rows, head_dim]
                         // or [rows, heads, head_dim] (vLLM's order)
  const float* basis;    // [heads, head_dim, head_dim] or null: a klt stream's inverse
                         // transform; row j of head k is component j's contribution to the
                         // head's channels, applied before `add` and RoPE
  const int64_t* row_at; // [rows] or null: where each row's head 0 starts in the output,
                         // in elements, in place of row * row_stride (rows that land in
                         // a paged cache's blocks); a negative entry: the row is not stored
  size_t chan_stride;    // elements from one channel to the next (0 or 1: contiguous; a
                         // paged cache that keeps keys [head_dim, block] per head)
  const int64_t* chan_at;  // [head_dim] or null: where each channel sits from its row's
                           // head start, in place of chan_stride (a paged cache whose
                           // bfloat16 pairs interleave: vLLM's AMX layouts)
  int chan_zip;          // with chan_at, the form spread_tile stores fast: ZIP_CHANNELS
                         // or ZIP_ROWS (0: neither, every value on its own)
  const float* sinks;    // or null: attention-sink rows kept exact ([blocks * sink_rows,
                         // channels]), which replace the first sink_rows rows of every
  int sink_every;        // block of sink_every rows (0: one block, all the rows), from
  int sink_rows;         // symbols dequantized but not used: no basis, no `add`, then
                         // RoPE and the store as any row (store entries decoded as one
                         // stream each begin with theirs)
};

// The sink rows of `spec` met walking its rows in order from row r: at() is the current
// row's sink values (all channels), or null where it is not a sink row.
struct SinkWalk {
  const float* base;
  size_t stride, block;
  int every, n, phase;

  SinkWalk(const DequantSpec& spec, int r)
      : base(spec.sink_rows > 0 ? spec.sinks : nullptr),
        stride((size_t)spec.heads * spec.head_dim),
        block(0), every(spec.sink_every), n(spec.sink_rows), phase(r) {
    if (base && every > 0) {
      block = (size_t)(r / every);
      phase = r % every;
    }
  }
  const float* at() const {
    return base && phase < n ? base + (block * n + (size_t)phase) * stride : nullptr;
  }
  void next() {
    if (!base) return;
    if (++phase == every) phase = 0, ++block;
  }
};

// chan_at's forms: channels 2c and 2c + 1 adjacent (a token's pairs, tokens two apart:
// AMX keys), or channels by eights two apart (two tokens' values interleaved: AMX values).
constexpr int ZIP_CHANNELS = 1, ZIP_ROWS = 2;

// `symbols` is [rows, channels + 1] (the last column is the step code). Matches the
// PyTorch path bit for bit: ((s - R) * (grid[code] * mult[c])) (+ add[c] if given), then
// x * cos + rotate_half(x) * sin, each product rounded separately (no FMA contraction).
// With `basis`, x is first replaced by y = sum_j x[j] * basis[k][j] over the nonzero x[j]
// in ascending j, alternately into two sums from +0 (the 1st, 3rd, ... term into one, the
// 2nd, 4th, ... into the other), each term a fused multiply-add (correctly rounded, so
// std::fmaf, the AVX2/AVX-512 FMA instructions and CUDA's __fmaf_rn agree), then the two
// sums added: every path sums in this order, so all are bit-identical.
// With `out_bf16` the float32 result of all that is rounded to bfloat16 as it is stored.
// A sink row (`sinks`) takes its values from there instead of the sums (its symbols are
// still checked) and adds no `add`.
// `symbols` holds rows [row0, row0 + rows) of the stream, which land at those rows of
// `out` and take those rows of cos/sin. Returns an error for a symbol above 2R (data
// inconsistent with the header). Runs the AVX2 variant (dequant_avx2.cpp, bit-identical:
// the same IEEE operations in the same order) where the decoder runs its AVX2 path.
std::string dequant_token(const uint8_t* symbols, int rows, const DequantSpec& spec,
                          int row0 = 0);

// The two variants behind it; the AVX2 one handles head_dim % 16 == 0 (false otherwise,
// or where it is not built) and sets *bad_row to the first row with a bad symbol, or -1.
void dequant_token_scalar(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                          int* bad_row);
bool dequant_token_avx2(const uint8_t* symbols, int rows, const DequantSpec& spec, int row0,
                        int* bad_row);

// The inverse transform of one head (basis.cpp), AVX2+FMA or AVX-512, as the scalar
// variant sums it (head_dim % 16 == 0, at most 256), in blocks of cb = basis_block(d)
// channels. pad_basis copies the head's basis ([d, d]) into out ([d + 1, d] floats,
// 64-byte aligned): block b is rows 0..d-1 of its channels [b * cb, (b + 1) * cb), cb
// floats each, then a row of -0.0f. basis_terms lists x's nonzero terms (vals and off:
// d slots each) and returns how many; the slot after them is a pad term. basis_load_terms
// lists them straight from a head's symbols s (d of them) dequantized as (s - r) * (step
// * mult[c]), the values never stored; -1 if a symbol is past 2r; AVX-512 only, and
// every slot up to d is a pad (its sums take two rows, the shorter padded). basis_sums writes
// blocks [b0, b1) (out[i] + b * cb) of `rows` rows (1; 2 with `avx512`) from their
// terms, n of each (even, at least each row's count: the rest are its pads). `avx512`:
// the AVX-512 variant (the same bits). basis_simd_ok: whether this CPU has the FMA
// instructions they need (else the scalar path).
bool basis_simd_ok();
int basis_block(int d, bool avx512);
void pad_basis(const float* basis, int d, int cb, float* out);
int basis_terms(const float* x, int d, int cb, float* vals, int* off);
int basis_load_terms(const uint8_t* s, const float* mult, float step, int r, int d, int cb,
                     float* vals, int* off);
void basis_sums(const float* const* vals, const int* const* off, int rows, int n,
                const float* basis, int d, int cb, int b0, int b1, float* const* out,
                bool avx512);

// A thread's reused buffer of at least `floats` floats, 64-byte aligned (grown, never
// shrunk: a klt decode asks for one per head and chunk).
float* basis_scratch(size_t floats);

// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0: PyTorch's cast.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Whether row `row` is stored (row_at: not negative).
inline bool row_kept(const DequantSpec& spec, int row) {
  return !spec.row_at || spec.row_at[row] >= 0;
}

// Where row `row` of head `k` of the output starts, in elements (a kept row).
inline size_t out_offset(const DequantSpec& spec, int k, int row) {
  if (spec.row_at) return (size_t)k * spec.head_stride + (size_t)spec.row_at[row];
  return (size_t)k * spec.head_stride +
         (size_t)row * (spec.row_stride ? spec.row_stride : (size_t)spec.head_dim);
}

// Whether a kept row's channels are written in place (contiguous), else from a row of
// floats by store_spread.
inline bool dense_out(const DequantSpec& spec) {
  return !spec.chan_at && spec.chan_stride <= 1;
}

// A head's row of floats `x` stored at `off` with channels chan_stride apart, or where
// chan_at puts them (float32, or bfloat16 rounded as to_bf16).
inline void store_spread(const float* x, const DequantSpec& spec, size_t off) {
  const size_t cs = spec.chan_stride;
  if (spec.chan_at) {
    for (int i = 0; i < spec.head_dim; ++i) {
      const size_t at = off + (size_t)spec.chan_at[i];
      if (spec.out) {
        spec.out[at] = x[i];
      } else {
        spec.out_bf16[at] = to_bf16(x[i]);
      }
    }
  } else if (spec.out) {
    for (int i = 0; i < spec.head_dim; ++i) spec.out[off + (size_t)i * cs] = x[i];
  } else {
    for (int i = 0; i < spec.head_dim; ++i) spec.out_bf16[off + (size_t)i * cs] = to_bf16(x[i]);
  }
}

}  // namespace kvc
