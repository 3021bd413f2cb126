// CPU rANS encoder: one blob per chunk of rows, lanes interleaved as in common/rans.h.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

namespace kvc {

// Encodes rows [0, rows) of the row-major symbol matrix `symbols` ([rows][channels]) into
// `out` (replaced). `freqs`/`cums` are [channels][alphabet]. Returns an empty string on
// success, else a message naming the offending token and channel.
std::string encode_blob(const uint8_t* symbols, int rows, int channels, const uint16_t* freqs,
                        const uint32_t* cums, int alphabet, std::vector<uint8_t>* out);

// x / f for every 32-bit x and 1 <= f <= PROB_SCALE, as encode_blob divides (by a
// multiply; exposed for tests).
uint32_t div_by_freq(uint32_t x, uint32_t f);

// Exclusive prefix sums of each channel's table: cums[c][s] = sum freqs[c][0..s).
void cumulative(const uint16_t* freqs, int channels, int alphabet, uint32_t* cums);

// --- writer side: what codec/core/tables.py and codec/core/quant.py compute, fused ------

// Level (1..63) of a symbol seen `count` > 0 times in a channel whose most frequent symbol
// is seen `peak` times: tables.levels_from_counts, same float64 operations in the same
// order (63 + 2 * round(2 * log2(count / peak)), ties to even, clipped to [1, 63]).
uint8_t level_of(uint64_t count, uint64_t peak);

// The tables the writer stores for one stream's symbols [rows][channels] (values below
// `alphabet`): per channel the histogram, pooled over channels of equal `groups` entry
// where `groups` ([channels] column ids, or null) is given (streams.stream_counts), its
// levels (a channel without tokens gets level 63 on symbol 0), and from them
//   * freqs [channels][alphabet]: normalize_freqs of the levels (tables.freqs_from_levels),
//   * spans [channels][2]: first and last present symbol,
//   * codes (appended): per channel its span's codes, 64 - level or 0 for an absent symbol
// (spans and codes are tables.pack_levels of the levels, split per stream). Returns an
// empty string, or what is wrong with the input.
std::string stream_tables(const uint8_t* symbols, int rows, int channels, int alphabet,
                          const int64_t* groups, uint16_t* freqs, uint8_t* spans,
                          std::vector<uint8_t>* codes);

// One layer's stream input (streams.stream_input) from x [heads][rows][head_dim] (heads
// `head_stride` floats apart, rows and channels contiguous) into out [rows][heads *
// head_dim]; with cos/sin ([rows][rotary_dim]) the keys are un-rotated first as
// transforms.rope(inverse=True) does it: over the first rotary_dim channels
// (x * cos - rotate_half(x) * sin) / divisor, each operation rounded to float32, the other
// channels as they are. Returns whether every value written is finite.
bool stream_input(const float* x, size_t head_stride, int heads, int rows, int head_dim,
                  const float* cos, const float* sin, int rotary_dim, float divisor,
                  float* out);

// Uniform quantizer with a coded per-token step (quant.Uniform, scale "token"): symbols
// [rows][channels + 1] of x [rows][channels], each row's last column its step code. Bit
// for bit the PyTorch path: step = grid[code] * mult[c], q = round(x / step) (ties to
// even) clamped to [-R, R], plus R; R for every channel of a row whose code is 0.
void quantize_token(const float* x, const uint8_t* code, int rows, int channels,
                    const float* grid, const float* mult, int half_range, uint8_t* out);

// Absmax quantizer (quant.AbsmaxToken) given each row's factor inv[t] = (1 / scale) * M:
// q = round(x * inv[t] + M) (each operation rounded to float32, ties to even), clamped
// to [0, 2M]; out [rows][channels].
void quantize_absmax(const float* x, const float* inv, int rows, int channels, int m,
                     uint8_t* out);

}  // namespace kvc
