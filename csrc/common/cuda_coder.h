// Host API of the CUDA coder (csrc/decoder/rans_decode.cu, csrc/encoder/rans_encode.cu).
// Plain C++ types only: pointers are device pointers, the stream is a cudaStream_t passed
// as void*. Nothing here allocates or synchronizes; every launch runs on the caller's
// stream and reports per-item status in a device array (0 = ok, see Status).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace kvc {
namespace gpu {

enum Status : int32_t {
  OK = 0,
  BAD_SIZE = 1,          // blob shorter than its lane states or odd word bytes
  BAD_INITIAL_STATE = 2,
  TRUNCATED = 3,         // the word stream ended early
  BAD_FINAL_STATE = 4,   // corrupt blob
  UNREAD_WORDS = 5,      // corrupt blob
  SYMBOL_RANGE = 6,      // a symbol above the quantizer's range (header/data mismatch)
  ZERO_FREQUENCY = 7,    // encoder: a symbol absent from its table
  OVERFLOW = 8,          // encoder: output capacity too small
  BAD_ITEM = 9,          // geometry out of the supported range
};

// Output element types of the fused dequantizer.
enum DType : int32_t { F16 = 0, BF16 = 1, F32 = 2 };

// Decode tables of one stream: slot -> symbol [channels][4096] and
// symbol -> freq | cum << 16 [channels][256], as csrc/decoder/decoder.cpp builds them.
struct StreamTables {
  const uint8_t* symbol;
  const uint32_t* range;
};

// One blob (a chunk of one layer's keys or values), decoded by one half-warp.
struct DecodeItem {
  const uint8_t* blob;   // device bytes
  uint32_t size;
  int32_t rows;          // tokens in the chunk
  int32_t channels;      // coded columns (for "uniform token": C + 1, the step code last)
  StreamTables tables;
  uint8_t* symbols;      // [rows, channels] scratch, always written
  // Fused dequantization (dst == nullptr: symbols only, the caller dequantizes).
  void* dst;
  int32_t dtype;         // DType
  int32_t heads, head_dim;       // heads * head_dim == channels - 1
  int32_t half_range;            // R
  const float* grid;             // [256] per-token step codes (codec.quant.STEP_GRID)
  const float* mult;             // [channels - 1] per-channel step multipliers
  const float* add;              // [channels - 1] or nullptr: per-channel offsets added
                                 // after the step, before RoPE (a centered stream's means)
  const float* cos;              // [rows, head_dim] or nullptr (no RoPE)
  const float* sin;
  // Destination addressing, in elements: token t of head h, dim i goes to
  //   dst + h * stride_head + i * stride_dim + where(t), with
  //   where(t) = t * stride_token                                       (slots == nullptr)
  //   where(t) = (s / block_size) * stride_block + (s % block_size) * stride_token,
  //              s = slots[t]                                           (paged, vLLM)
  int64_t stride_head, stride_token, stride_dim, stride_block;
  const int64_t* slots;
  int32_t block_size;
  int32_t first_row;     // rows below this are the sink tokens: written from `sink`, or
                         // left untouched when it is nullptr
  const float* sink;     // [first_row, channels - 1] or nullptr: the rows' final values
                         // (RoPE applied), as the CPU decoder restores them
};

// Builds StreamTables from freqs [channels][alphabet] (uint16, rows summing to 4096).
int build_tables(const uint16_t* freqs, int channels, int alphabet, uint8_t* symbol,
                 uint32_t* range, void* stream);

// Decodes items[0..n) (the array itself in device memory); status[i] per item.
int decode(const DecodeItem* items, int n, int32_t* status, void* stream);

// The same decode with each stream's tables in shared memory: groups[0..n_groups] (device
// memory) splits the items into runs of at most ITEMS_PER_GROUP that share one stream's
// tables and channel count (the chunks of one layer's keys or values), one block each;
// max_channels (the largest channel count, at most shared_decode_max_channels()) sizes
// the block's shared memory. Needs the range tables build_tables writes (past the
// alphabet: cum = PROB_SCALE). Same symbols, statuses and outputs as decode.
constexpr int ITEMS_PER_GROUP = 8;
constexpr size_t SHARED_DECODE_BYTES = 227 * 1024;  // the most a block may have (sm_80, sm_90)
int shared_decode_max_channels();
int decode_shared(const DecodeItem* items, const int32_t* groups, int n_groups,
                  int max_channels, int32_t* status, void* stream);

// One blob to encode, by one half-warp: symbols [rows, channels] with
// range tables freq | cum << 16 per (channel, symbol) [channels][256].
struct EncodeItem {
  const uint8_t* symbols;
  int32_t rows, channels;
  const uint32_t* range;
  uint16_t* scratch;     // >= rows * channels + 16 words
  uint8_t* out;          // >= max_encoded_size(rows, channels) bytes
  uint64_t capacity;
};

// Encodes items[0..n); sizes[i] receives the blob's byte length, status[i] its status.
int encode(const EncodeItem* items, int n, uint64_t* sizes, int32_t* status, void* stream);

// Builds encoder range tables from freqs (freq | cum << 16 per (channel, symbol)).
int build_range(const uint16_t* freqs, int channels, int alphabet, uint32_t* range,
                void* stream);

}  // namespace gpu
}  // namespace kvc
