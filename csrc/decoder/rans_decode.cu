// CUDA decoder for bitstream v1 (csrc/common/rans.h), fused with dequantization and
// RoPE re-application. One half-warp (16 threads = the 16 lanes of the format) decodes
// one blob: each thread owns one lane state; per step the refilling lanes take
// consecutive words of the shared stream in ascending lane order (ballot + popc), exactly
// as the CPU decoder does serially. Per-item status, never a trap.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_coder.h"
#include "common/rans.h"

namespace kvc {
namespace gpu {
namespace {

constexpr int ITEMS_PER_BLOCK = 8;  // 8 half-warps per 128-thread block

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

// (s - R) * (step * mult), rounded like the CPU/PyTorch path (no FMA contraction).
__device__ inline float dequant(uint32_t s, int r, float step, float mult) {
  return __fmul_rn((float)((int)s - r), __fmul_rn(step, mult));
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
    range[(size_t)c * MAX_ALPHABET + s] = s < alphabet ? (f[s] | (cum[s] << 16)) : 1u;
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

__device__ void dequant_rows(const DecodeItem& it, int lane, unsigned mask, int32_t* bad) {
  const int c = it.channels - 1, d = it.head_dim, half = d / 2;
  const int top = 2 * it.half_range;
  int flag = 0;
  for (int t = it.first_row; t < it.rows; ++t) {
    const uint8_t* row = it.symbols + (size_t)t * it.channels;
    const float step = it.grid[row[c]];
    int64_t where = (int64_t)t * it.stride_token;
    if (it.slots) {
      const int64_t s = it.slots[t];
      where = (s / it.block_size) * it.stride_block + (s % it.block_size) * it.stride_token;
    }
    for (int idx = lane; idx < c; idx += 16) {
      const int h = idx / d, i = idx % d;
      const uint32_t s = row[idx];
      flag |= (int)s > top;
      float v = dequant(s, it.half_range, step, it.mult[idx]);
      if (it.cos) {
        const int j = h * d + (i < half ? i + half : i - half);
        const float p = dequant(row[j], it.half_range, step, it.mult[j]);
        const float a = __fmul_rn(v, it.cos[(size_t)t * d + i]);
        const float b = __fmul_rn(i < half ? -p : p, it.sin[(size_t)t * d + i]);
        v = __fadd_rn(a, b);
      }
      store(it.dst, it.dtype, h * it.stride_head + i * it.stride_dim + where, v);
    }
  }
  if (__any_sync(mask, flag) && lane == 0) *bad = SYMBOL_RANGE;
}

__global__ void decode_kernel(const DecodeItem* items, int n, int32_t* status) {
  const int lane = threadIdx.x & 15;
  const int id = blockIdx.x * ITEMS_PER_BLOCK + (threadIdx.x >> 4);
  if (id >= n) return;  // uniform across the half-warp
  const unsigned shift = threadIdx.x & 16;
  const unsigned mask = 0xffffu << shift;
  const DecodeItem it = items[id];
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
  for (int t = 0; t < it.rows; ++t) {
    uint8_t* row = it.symbols + (size_t)t * it.channels;
    for (int g = 0; g < groups; ++g) {
      const int c = g * LANES + lane;
      bool need = false;
      if (c < it.channels) {
        const uint32_t s = it.tables.symbol[(size_t)c * PROB_SCALE + (x & PROB_MASK)];
        const uint32_t r = it.tables.range[(size_t)c * MAX_ALPHABET + s];
        dec_advance(&x, r & 0xffff, r >> 16);
        row[c] = (uint8_t)s;
        need = dec_needs_word(x);
      }
      const unsigned ball = (__ballot_sync(mask, need) >> shift) & 0xffffu;
      const uint32_t idx = pos + __popc(ball & ((1u << lane) - 1u));
      if (need && idx < n_words) {
        x = dec_refill(x, (uint16_t)(words[2 * idx] | (words[2 * idx + 1] << 8)));
      }
      pos += __popc(ball);
      if (pos > n_words) {  // uniform: every lane saw the same ballot
        if (lane == 0) status[id] = TRUNCATED;
        return;
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

}  // namespace gpu
}  // namespace kvc
