// CUDA encoder for bitstream v1: the same bytes as csrc/encoder/encoder.cpp. One
// half-warp per blob; per step (reverse order) the renormalizing lanes emit their words
// in descending lane order, as the CPU encoder does serially. Words go to a scratch
// buffer in emission order and are written reversed after the lane states.
#include <cuda_runtime.h>

#include "common/cuda_coder.h"
#include "common/rans.h"

namespace kvc {
namespace gpu {
namespace {

constexpr int ITEMS_PER_BLOCK = 8;

__global__ void build_range_kernel(const uint16_t* freqs, int channels, int alphabet,
                                   uint32_t* range) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  uint32_t acc = 0;
  for (int s = 0; s < MAX_ALPHABET; ++s) {
    const uint32_t f = s < alphabet ? freqs[(size_t)c * alphabet + s] : 0;
    range[(size_t)c * MAX_ALPHABET + s] = f | (acc << 16);
    acc += f;
  }
}

__global__ void encode_kernel(const EncodeItem* items, int n, uint64_t* sizes,
                              int32_t* status) {
  const int lane = threadIdx.x & 15;
  const int id = blockIdx.x * ITEMS_PER_BLOCK + (threadIdx.x >> 4);
  if (id >= n) return;
  const unsigned shift = threadIdx.x & 16;
  const unsigned mask = 0xffffu << shift;
  const EncodeItem it = items[id];
  if (it.rows < 0 || it.channels < 1 || it.channels > 65535) {
    if (lane == 0) status[id] = BAD_ITEM, sizes[id] = 0;
    return;
  }
  const uint64_t cap_words = (uint64_t)it.rows * it.channels + 16;
  uint32_t x = RANS_L;
  uint64_t count = 0;
  const int groups = (it.channels + LANES - 1) / LANES;
  for (int t = it.rows - 1; t >= 0; --t) {
    const uint8_t* row = it.symbols + (size_t)t * it.channels;
    for (int g = groups - 1; g >= 0; --g) {
      const int c = g * LANES + lane;
      const bool active = c < it.channels;
      uint32_t f = 1, cum = 0;
      bool need = false, zero = false;
      uint16_t w = 0;
      if (active) {
        const uint32_t r = it.range[(size_t)c * MAX_ALPHABET + row[c]];
        f = r & 0xffff;
        cum = r >> 16;
        zero = f == 0;
        if (!zero) need = enc_renorm(&x, f, &w);
      }
      if (__any_sync(mask, zero)) {
        if (lane == 0) status[id] = ZERO_FREQUENCY, sizes[id] = 0;
        return;
      }
      const unsigned ball = (__ballot_sync(mask, need) >> shift) & 0xffffu;
      if (need) {
        const uint64_t idx = count + __popc(ball >> (lane + 1));
        if (idx < cap_words) it.scratch[idx] = w;
      }
      count += __popc(ball);
      if (active) enc_put(&x, f, cum);
    }
  }
  const uint64_t size = (uint64_t)STATE_BYTES + 2 * count;
  if (size > it.capacity || count > cap_words) {
    if (lane == 0) status[id] = OVERFLOW, sizes[id] = 0;
    return;
  }
  for (int b = 0; b < 4; ++b) it.out[4 * lane + b] = (uint8_t)(x >> (8 * b));
  __syncwarp(mask);  // scratch words written by other lanes are visible
  for (uint64_t i = lane; i < count; i += 16) {
    const uint16_t w = it.scratch[count - 1 - i];
    it.out[STATE_BYTES + 2 * i] = (uint8_t)(w & 0xff);
    it.out[STATE_BYTES + 2 * i + 1] = (uint8_t)(w >> 8);
  }
  if (lane == 0) status[id] = OK, sizes[id] = size;
}

}  // namespace

int build_range(const uint16_t* freqs, int channels, int alphabet, uint32_t* range,
                void* stream) {
  if (channels < 1 || alphabet < 1 || alphabet > MAX_ALPHABET) return (int)cudaErrorInvalidValue;
  build_range_kernel<<<(channels + 127) / 128, 128, 0, static_cast<cudaStream_t>(stream)>>>(
      freqs, channels, alphabet, range);
  return (int)cudaGetLastError();
}

int encode(const EncodeItem* items, int n, uint64_t* sizes, int32_t* status, void* stream) {
  if (n <= 0) return (int)cudaSuccess;
  const int blocks = (n + ITEMS_PER_BLOCK - 1) / ITEMS_PER_BLOCK;
  encode_kernel<<<blocks, 16 * ITEMS_PER_BLOCK, 0, static_cast<cudaStream_t>(stream)>>>(
      items, n, sizes, status);
  return (int)cudaGetLastError();
}

}  // namespace gpu
}  // namespace kvc
