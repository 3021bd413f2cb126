// CUDA decoder for bitstream v1 (csrc/common/rans.h), fused with dequantization and
// RoPE re-application. One half-warp (16 threads = the 16 lanes of the format) decodes
// one blob: each thread owns one lane state; per step the refilling lanes take
// consecutive words of the shared stream in ascending lane order (ballot + popc), exactly
// as the CPU decoder does serially. Per-item status, never a trap.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "common/cuda_coder.h"
#include "common/rans.h"

namespace kvc {
namespace gpu {
namespace {

constexpr int ITEMS_PER_BLOCK = ITEMS_PER_GROUP;  // 8 half-warps per 128-thread block

__device__ inline uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
         ((uint32_t)p[3] << 24);
}

__device__ inline void store(void* dst, int dtype, int64_t off, float v) {
  if (dtype == F16) {
    static_cast<__half*>(dst)[off] = __float2half_rn(v);
  } else if (dtype == BF16) {
    static_cast<__nv_bfloat16*>(dst)[off] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(dst)[off] = v;
  }
}

// (s - R) * (step * mult) (+ add), rounded like the CPU/PyTorch path (no FMA contraction).
__device__ inline float dequant(uint32_t s, int r, float step, float mult, const float* add,
                                int idx) {
  const float v = __fmul_rn((float)((int)s - r), __fmul_rn(step, mult));
  return add ? __fadd_rn(v, add[idx]) : v;
}

__global__ void build_tables_kernel(const uint16_t* freqs, int alphabet, uint8_t* symbol,
                                    uint32_t* range) {
  __shared__ uint32_t cum[MAX_ALPHABET + 1];
  const int c = blockIdx.x;
  const uint16_t* f = freqs + (size_t)c * alphabet;
  if (threadIdx.x == 0) {
    uint32_t acc = 0;
    for (int s = 0; s < alphabet; ++s) {
      cum[s] = acc;
      acc += f[s];
    }
    cum[alphabet] = acc;
  }
  __syncthreads();
  for (int s = threadIdx.x; s < MAX_ALPHABET; s += blockDim.x) {
    range[(size_t)c * MAX_ALPHABET + s] = s < alphabet ? (f[s] | (cum[s] << 16))
                                                         : (PROB_SCALE << 16);
  }
  for (int slot = threadIdx.x; slot < (int)PROB_SCALE; slot += blockDim.x) {
    int lo = 0, hi = alphabet - 1;  // last s with cum[s] <= slot
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (cum[mid] <= (uint32_t)slot) lo = mid;
      else hi = mid - 1;
    }
    // Zero-frequency symbols share their cum with the next one; take the present one.
    while (lo + 1 < alphabet && cum[lo + 1] <= (uint32_t)slot) ++lo;
    symbol[(size_t)c * PROB_SCALE + slot] = (uint8_t)lo;
  }
}

// Element offset of token t's row in the destination (slot-mapped in a paged cache).
__device__ inline int64_t row_offset(const DecodeItem& it, int t) {
  if (!it.slots) return (int64_t)t * it.stride_token;
  const int64_t s = it.slots[t];
  int64_t blk, off;
  if (s >= 0 && s <= 0x7fffffff) {  // 32-bit division where the slot allows it
    blk = (uint32_t)s / (uint32_t)it.block_size;
    off = s - blk * it.block_size;
  } else {
    blk = s / it.block_size;
    off = s % it.block_size;
  }
  return blk * it.stride_block + off * it.stride_token;
}

__device__ void dequant_rows(const DecodeItem& it, int lane, unsigned mask, int32_t* bad) {
  const int c = it.channels - 1, d = it.head_dim, half = d / 2;
  const int top = 2 * it.half_range;
  const int h0 = lane / d, i0 = lane % d;  // then stepped by 16 channels, no division
  const int sink_rows = it.sink ? min(it.first_row, it.rows) : 0;
  for (int t = 0; t < sink_rows; ++t) {  // the file's exact rows, RoPE already applied
    const int64_t where = row_offset(it, t);
    int h = h0, i = i0;
    for (int idx = lane; idx < c; idx += 16) {
      store(it.dst, it.dtype, h * it.stride_head + i * it.stride_dim + where,
            it.sink[(size_t)t * c + idx]);
      for (i += 16; i >= d; i -= d) ++h;
    }
  }
  int flag = 0;
  for (int t = it.first_row; t < it.rows; ++t) {
    const uint8_t* row = it.symbols + (size_t)t * it.channels;
    const float step = it.grid[row[c]];
    const int64_t where = row_offset(it, t);
    int h = h0, i = i0;
    for (int idx = lane; idx < c; idx += 16) {
      const uint32_t s = row[idx];
      flag |= (int)s > top;
      float v = dequant(s, it.half_range, step, it.mult[idx], it.add, idx);
      if (it.cos) {
        const int j = h * d + (i < half ? i + half : i - half);
        const float p = dequant(row[j], it.half_range, step, it.mult[j], it.add, j);
        const float a = __fmul_rn(v, it.cos[(size_t)t * d + i]);
        const float b = __fmul_rn(i < half ? -p : p, it.sin[(size_t)t * d + i]);
        v = __fadd_rn(a, b);
      }
      store(it.dst, it.dtype, h * it.stride_head + i * it.stride_dim + where, v);
      for (i += 16; i >= d; i -= d) ++h;
    }
  }
  if (__any_sync(mask, flag) && lane == 0) *bad = SYMBOL_RANGE;
}

// Decodes one item with one half-warp; `look(c, slot, &freq, &cum)` gives the symbol of a
// slot in channel c's table (global tables, or the block's shared-memory copy).
template <class Lookup>
__device__ void decode_item(const DecodeItem& it, int id, int lane, unsigned shift,
                            unsigned mask, int32_t* status, Lookup look) {
  int32_t st = OK;
  if (it.rows < 0 || it.channels < 1 || it.channels > 65535 ||
      (it.dst && (it.heads < 1 || it.head_dim < 1 || it.heads * it.head_dim != it.channels - 1 ||
                  (it.cos && it.head_dim % 2) || it.half_range < 0 || it.half_range > 127))) {
    st = BAD_ITEM;
  } else if (it.size < (uint32_t)STATE_BYTES || ((it.size - STATE_BYTES) & 1u)) {
    st = BAD_SIZE;
  }
  if (st != OK) {
    if (lane == 0) status[id] = st;
    return;
  }
  uint32_t x = load_u32(it.blob + 4 * lane);
  const bool bad_init = lane < it.channels ? x < RANS_L : x != RANS_L;
  if (__any_sync(mask, bad_init)) {
    if (lane == 0) status[id] = BAD_INITIAL_STATE;
    return;
  }
  const uint8_t* words = it.blob + STATE_BYTES;
  const uint32_t n_words = (it.size - STATE_BYTES) / 2;
  const int groups = (it.channels + LANES - 1) / LANES;
  uint32_t pos = 0;
  // The next 32 words of the stream live in registers, lane k holding words base + k
  // (w0) and base + 16 + k (w1); a refilling lane takes its word by shuffle, and the
  // window's next half is loaded as soon as the first is used up, ~16 words before any
  // lane needs it: no global load on the decode's dependency chain.
  uint32_t base = 0;
  const auto word_at = [&](uint32_t k) -> uint32_t {
    return k < n_words ? (uint32_t)(words[2 * k] | (words[2 * k + 1] << 8)) : 0u;
  };
  uint32_t w0 = word_at(lane), w1 = word_at(16 + lane);
  for (int t = 0; t < it.rows; ++t) {
    uint8_t* row = it.symbols + (size_t)t * it.channels;
    for (int g = 0; g < groups; ++g) {
      const int c = g * LANES + lane;
      bool need = false;
      if (c < it.channels) {
        uint32_t freq, cum;
        const uint32_t s = look(c, x & PROB_MASK, &freq, &cum);
        dec_advance(&x, freq, cum);
        row[c] = (uint8_t)s;
        need = dec_needs_word(x);
      }
      const unsigned ball = (__ballot_sync(mask, need) >> shift) & 0xffffu;
      const uint32_t idx = pos + __popc(ball & ((1u << lane) - 1u));
      const uint32_t k = idx - base;  // < 32: pos < base + 16 and at most 16 are taken
      const uint32_t lo = __shfl_sync(mask, w0, (int)(k & 15u), 16);
      const uint32_t hi = __shfl_sync(mask, w1, (int)(k & 15u), 16);
      if (need && idx < n_words) x = dec_refill(x, (uint16_t)(k < 16 ? lo : hi));
      pos += __popc(ball);
      if (pos > n_words) {  // uniform: every lane saw the same ballot
        if (lane == 0) status[id] = TRUNCATED;
        return;
      }
      if (pos >= base + 16) {  // uniform; at most one half used up per step
        base += 16;
        w0 = w1;
        w1 = word_at(base + 16 + lane);
      }
    }
  }
  const bool bad_final = lane < it.channels && x != RANS_L;
  if (__any_sync(mask, bad_final)) {
    if (lane == 0) status[id] = BAD_FINAL_STATE;
    return;
  }
  if (pos != n_words) {
    if (lane == 0) status[id] = UNREAD_WORDS;
    return;
  }
  int32_t result = OK;
  if (it.dst) {
    __syncwarp(mask);  // the row symbols written by other lanes are visible
    dequant_rows(it, lane, mask, &result);
  }
  if (lane == 0) status[id] = result;
}

// Global tables: slot -> symbol [c][4096], symbol -> freq | cum << 16 [c][256].
__global__ void decode_kernel(const DecodeItem* items, int n, int32_t* status) {
  const int lane = threadIdx.x & 15;
  const int id = blockIdx.x * ITEMS_PER_BLOCK + (threadIdx.x >> 4);
  if (id >= n) return;  // uniform across the half-warp
  const unsigned shift = threadIdx.x & 16;
  const DecodeItem it = items[id];
  decode_item(it, id, lane, shift, 0xffffu << shift, status,
              [&](int c, uint32_t slot, uint32_t* freq, uint32_t* cum) {
                const uint32_t s = it.tables.symbol[(size_t)c * PROB_SCALE + slot];
                const uint32_t r = it.tables.range[(size_t)c * MAX_ALPHABET + s];
                *freq = r & 0xffff;
                *cum = r >> 16;
                return s;
              });
}

// One block per group of <= ITEMS_PER_BLOCK items that share one stream's tables (the
// chunks of one layer's keys or values): the block copies the cumulative frequencies into
// shared memory, [c][257] (uint16, PROB_SCALE past the alphabet), with a bucket index
// [c][65] (the symbol of slot 64 b, and of the last slot), and each lookup is a short
// binary search there instead of two dependent loads from tables that, for a whole file,
// do not fit in L2.
constexpr int BUCKET_SHIFT = 6;
constexpr int BUCKETS = (int)(PROB_SCALE >> BUCKET_SHIFT) + 1;
constexpr int CUM_STRIDE = MAX_ALPHABET + 1;
constexpr int SHARED_BYTES_PER_CHANNEL = CUM_STRIDE * 2 + BUCKETS;

__device__ inline int last_at_most(const uint16_t* cum, int lo, int hi, uint32_t slot) {
  while (lo < hi) {  // the largest s in [lo, hi] with cum[s] <= slot (cum[lo] <= slot)
    const int mid = (lo + hi + 1) >> 1;
    if (cum[mid] <= slot) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__global__ void decode_shared_kernel(const DecodeItem* items, const int32_t* groups,
                                     int max_channels, int32_t* status) {
  extern __shared__ uint8_t shared[];
  const int g0 = groups[blockIdx.x], g1 = groups[blockIdx.x + 1];
  const int lane = threadIdx.x & 15;
  const int id = g0 + (threadIdx.x >> 4);
  const int channels = items[g0].channels;
  if (channels < 1 || channels > max_channels) {  // uniform across the block
    if (id < g1 && lane == 0) status[id] = BAD_ITEM;
    return;
  }
  uint16_t* cum = reinterpret_cast<uint16_t*>(shared);
  uint8_t* bucket = shared + (size_t)channels * CUM_STRIDE * 2;
  const uint32_t* range = items[g0].tables.range;
  for (int i = threadIdx.x; i < channels * CUM_STRIDE; i += blockDim.x) {
    const int c = i / CUM_STRIDE, s = i % CUM_STRIDE;
    cum[i] = s < MAX_ALPHABET ? (uint16_t)(range[(size_t)c * MAX_ALPHABET + s] >> 16)
                              : (uint16_t)PROB_SCALE;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < channels * BUCKETS; i += blockDim.x) {
    const int c = i / BUCKETS, b = i % BUCKETS;
    const uint32_t slot = min((uint32_t)b << BUCKET_SHIFT, PROB_MASK);
    bucket[i] = (uint8_t)last_at_most(cum + c * CUM_STRIDE, 0, MAX_ALPHABET - 1, slot);
  }
  __syncthreads();
  if (id >= g1) return;  // uniform across the half-warp; no barrier follows
  const unsigned shift = threadIdx.x & 16;
  const DecodeItem it = items[id];
  if (it.channels != channels || it.tables.range != range) {
    if (lane == 0) status[id] = BAD_ITEM;
    return;
  }
  decode_item(it, id, lane, shift, 0xffffu << shift, status,
              [&](int c, uint32_t slot, uint32_t* freq, uint32_t* cm) {
                const uint16_t* cc = cum + c * CUM_STRIDE;
                const uint8_t* bk = bucket + c * BUCKETS;
                const int b = (int)(slot >> BUCKET_SHIFT);
                const int s = last_at_most(cc, bk[b], bk[b + 1], slot);
                *cm = cc[s];
                *freq = (uint32_t)cc[s + 1] - cc[s];
                return (uint32_t)s;
              });
}

}  // namespace

int build_tables(const uint16_t* freqs, int channels, int alphabet, uint8_t* symbol,
                 uint32_t* range, void* stream) {
  if (channels < 1 || alphabet < 1 || alphabet > MAX_ALPHABET) return (int)cudaErrorInvalidValue;
  build_tables_kernel<<<channels, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      freqs, alphabet, symbol, range);
  return (int)cudaGetLastError();
}

int decode(const DecodeItem* items, int n, int32_t* status, void* stream) {
  if (n <= 0) return (int)cudaSuccess;
  const int blocks = (n + ITEMS_PER_BLOCK - 1) / ITEMS_PER_BLOCK;
  decode_kernel<<<blocks, 16 * ITEMS_PER_BLOCK, 0, static_cast<cudaStream_t>(stream)>>>(
      items, n, status);
  return (int)cudaGetLastError();
}

int shared_decode_max_channels() {
  return (int)(SHARED_DECODE_BYTES / SHARED_BYTES_PER_CHANNEL);
}

int decode_shared(const DecodeItem* items, const int32_t* groups, int n_groups,
                  int max_channels, int32_t* status, void* stream) {
  if (n_groups <= 0) return (int)cudaSuccess;
  if (max_channels < 1 || max_channels > shared_decode_max_channels())
    return (int)cudaErrorInvalidValue;
  // Above 48 KiB of dynamic shared memory a kernel must opt in, once per device.
  static std::atomic<uint64_t> opted{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return (int)err;
  const uint64_t bit = 1ull << (device & 63);
  if (!(opted.load() & bit)) {
    err = cudaFuncSetAttribute(decode_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)SHARED_DECODE_BYTES);
    if (err != cudaSuccess) return (int)err;
    opted.fetch_or(bit);
  }
  decode_shared_kernel<<<n_groups, 16 * ITEMS_PER_BLOCK,
                         (size_t)max_channels * SHARED_BYTES_PER_CHANNEL,
                         static_cast<cudaStream_t>(stream)>>>(items, groups, max_channels,
                                                              status);
  return (int)cudaGetLastError();
}

}  // namespace gpu
}  // namespace kvc
