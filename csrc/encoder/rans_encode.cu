// GPU encoder, one blob per warp, and the table builder on the device. Same step functions
// as the CPU encoder (common/rans.h). Not yet bound to Python and not yet run on a GPU:
// the CPU encoder is the reference it must match byte for byte.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/rans.h"

namespace kvc {

// One thread per table: levels [n][A] -> freqs [n][A]; ok[i] = 0 for an invalid row.
__global__ void kvc_normalize_freqs_kernel(const uint8_t* levels, int n, int A, uint16_t* freqs,
                                           uint8_t* ok) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) ok[i] = kvc_normalize_freqs(levels + (size_t)i * A, A, freqs + (size_t)i * A);
}

// Blob b codes rows[b] rows of `channels` symbols at symbols + sym_offsets[b] with the
// per-channel tables freqs/cums [channels][A]. Each warp walks the decode order backwards
// (as the CPU encoder does) and appends pushed words to scratch + scratch_offsets[b]
// (capacity rows * channels words, see kvc_max_encoded_size); within a step the pushing
// lanes take consecutive slots, highest lane first. Afterwards the warp writes the blob
// (32 states, then the words reversed) to blob_out + blob_offsets[b]; n_bytes[b] gets its
// length, or 0 if a symbol has zero frequency.
__global__ void kvc_encode_blobs(const uint8_t* symbols, const uint64_t* sym_offsets,
                                 const uint32_t* rows, int channels, const uint16_t* freqs,
                                 const uint32_t* cums, int A, uint16_t* scratch,
                                 const uint64_t* scratch_offsets, uint8_t* blob_out,
                                 const uint64_t* blob_offsets, int n_blobs, uint32_t* n_bytes) {
  const int b = (int)((blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / KVC_LANES);
  const int lane = threadIdx.x % KVC_LANES;
  if (b >= n_blobs) return;  // uniform per warp: blockDim is a multiple of 32
  const uint8_t* src = symbols + sym_offsets[b];
  uint16_t* pushed = scratch + scratch_offsets[b];
  const uint32_t above = lane == 31 ? 0u : ~((2u << lane) - 1);
  const int groups = (channels + KVC_LANES - 1) / KVC_LANES;
  uint32_t x = KVC_RANS_L, n = 0;
  bool bad = false;
  for (int t = (int)rows[b] - 1; t >= 0; --t) {
    for (int g = groups - 1; g >= 0; --g) {
      const int c = g * KVC_LANES + lane;
      bool push = false;
      uint16_t w = 0;
      if (c < channels) {
        const uint32_t s = src[(size_t)t * channels + c];
        const size_t k = (size_t)c * A + s;
        const uint32_t f = s < (uint32_t)A ? freqs[k] : 0;
        if (f == 0) bad = true;
        else push = kvc_enc_step(&x, f, cums[k], &w);
      }
      const uint32_t mask = __ballot_sync(0xffffffffu, push);
      if (push) pushed[n + __popc(mask & above)] = w;
      n += __popc(mask);
    }
  }
  if (__any_sync(0xffffffffu, bad)) {
    if (lane == 0) n_bytes[b] = 0;
    return;
  }
  uint8_t* dst = blob_out + blob_offsets[b];
  for (int k = 0; k < 4; ++k) dst[4 * lane + k] = (uint8_t)(x >> (8 * k));
  __syncwarp();
  for (uint32_t i = lane; i < n; i += KVC_LANES) {
    const uint16_t w = pushed[n - 1 - i];
    dst[KVC_STATE_BYTES + 2 * i] = (uint8_t)(w & 0xff);
    dst[KVC_STATE_BYTES + 2 * i + 1] = (uint8_t)(w >> 8);
  }
  if (lane == 0) n_bytes[b] = KVC_STATE_BYTES + 2 * n;
}

}  // namespace kvc
