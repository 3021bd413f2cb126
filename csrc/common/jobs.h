// The CPU coder's batch calls: many streams or chunks per call, run in parallel. Plain
// pointers and sizes only, inputs already checked and outputs owned by the caller, so a
// binding can run them without holding any interpreter lock. A job that fails reports its
// own error; the others still run.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "decoder/decoder.h"
#include "decoder/dequant.h"

namespace kvc {

// Per-channel frequency tables [channels][alphabet], each row summing to PROB_SCALE.
struct FreqTable {
  const uint16_t* freqs;
  int channels, alphabet;
};

// How many chunks of chunk_tokens (>= 1) rows cover rows (>= 0): the blobs of a stream.
// Not (rows + chunk_tokens - 1) / chunk_tokens, which overflows int for a chunk size near
// INT_MAX (and came out negative: a vector resized to that threw in a worker thread).
inline size_t chunk_count(int rows, int chunk_tokens) {
  return (size_t)(rows / chunk_tokens) + (rows % chunk_tokens != 0 ? 1 : 0);
}

// Symbols [rows][channels], coded one blob per chunk of chunk_tokens rows.
struct EncodeJob {
  const uint8_t* symbols;
  int rows, channels;
  FreqTable table;
};

struct EncodeResult {
  std::vector<std::vector<uint8_t>> blobs;
  std::string error;  // "" or "chunk i: ..."; the blobs are then incomplete
};

void encode_many(const EncodeJob* jobs, size_t n, int chunk_tokens, int threads,
                 EncodeResult* results);

// out[i] receives the decode tables of tables[i].
void build_decode_tables(const FreqTable* tables, size_t n, int threads,
                         DecodeTables* const* out);

struct Blob {
  const uint8_t* data;
  size_t size;
};

// One stream's blobs (one per chunk of chunk_tokens rows) into out [rows][channels].
struct DecodeJob {
  const Blob* blobs;
  size_t n_blobs;              // chunk_count(rows, chunk_tokens): the caller checks it
  FreqTable table;
  const DecodeTables* built;  // prebuilt tables, or null: build from `table`
  uint8_t* out;                // [rows][channels]; null with a dequantizer: not kept
  int rows, channels;
  const DequantSpec* dequant;  // or null: symbols only
};

// errors[i]: "" or what is wrong with job i ("blob i: ..." or the dequantizer's message).
void decode_many(const DecodeJob* jobs, size_t n, int chunk_tokens, int threads,
                 std::string* errors);

// Levels [n][alphabet] -> frequencies [n][alphabet] (normalize_freqs row by row).
struct LevelRows {
  const uint8_t* levels;
  uint16_t* freqs;
  size_t n;
  int alphabet;
};

// errors[i]: "" or the first bad row of rows[i].
void normalize_many(const LevelRows* rows, size_t n, int threads, std::string* errors);

// One stream's writer tables (encoder/encoder.h stream_tables): inputs, then outputs.
struct TablesJob {
  const uint8_t* symbols;  // [rows][channels]
  int rows, channels, alphabet;
  const int64_t* groups;   // [channels] or null
  uint16_t* freqs;         // [channels][alphabet]
  uint8_t* spans;          // [channels][2]
  std::vector<uint8_t> codes;
  std::string error;
};

void stream_tables_many(TablesJob* jobs, size_t n, int threads);

// One layer's stream input (encoder/encoder.h stream_input); `finite` is its result.
struct InputJob {
  const float* x;  // [heads][rows][head_dim], heads head_stride floats apart
  size_t head_stride;
  int heads, rows, head_dim;
  const float* cos;  // [rows][rotary_dim] or null
  const float* sin;
  int rotary_dim;
  float divisor;
  float* out;  // [rows][heads * head_dim]
  bool finite;
};

void stream_inputs_many(InputJob* jobs, size_t n, int threads);

// One layer's quantization (encoder/encoder.h quantize_token or quantize_absmax).
struct QuantizeJob {
  const float* x;       // [rows][channels]
  const uint8_t* code;  // token: [rows] step codes
  const float* inv;     // absmax: [rows] factors
  const float* grid;    // token: [256]
  const float* mult;    // token: [channels]
  int rows, channels;
  int param;            // token: R; absmax: M
  uint8_t* out;         // [rows][channels + 1] (token) or [rows][channels] (absmax)
};

void quantize_many(const QuantizeJob* jobs, size_t n, int threads);

}  // namespace kvc
