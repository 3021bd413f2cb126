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
  size_t n_blobs;
  FreqTable table;
  const DecodeTables* built;  // prebuilt tables, or null: build from `table`
  uint8_t* out;
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

}  // namespace kvc
