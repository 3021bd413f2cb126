// GPU decoder, one blob per warp: lane j of the warp is rANS lane j, so a step is one
// table load per lane plus a ballot + prefix count to hand out the shared words. Uses the
// same step functions as the CPU decoder (common/rans.h). Not yet bound to Python and not
// yet run on a GPU in CI: the CPU decoder is the reference it must match byte for byte.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/rans.h"

namespace kvc {

enum DecodeStatus : int32_t { kOk = 0, kBadLength = 1, kBadState = 2, kTruncated = 3, kCorrupt = 4 };

__device__ inline uint32_t load_u32(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// Blob b has bytes data[offsets[b], offsets[b] + sizes[b]) and decodes rows[b] rows of
// `channels` symbols into out + out_offsets[b]. lut is [channels][4096] kvc_dec_entry
// values, built like the CPU tables. status[b] gets a DecodeStatus.
__global__ void kvc_decode_blobs(const uint8_t* data, const uint64_t* offsets,
                                 const uint32_t* sizes, const uint32_t* rows,
                                 const uint32_t* lut, int channels, uint8_t* out,
                                 const uint64_t* out_offsets, int n_blobs, int32_t* status) {
  const int b = (int)((blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / KVC_LANES);
  const int lane = threadIdx.x % KVC_LANES;
  if (b >= n_blobs) return;  // uniform per warp: blockDim is a multiple of 32
  const uint8_t* blob = data + offsets[b];
  const uint32_t size = sizes[b];
  if (size < (uint32_t)KVC_STATE_BYTES || size % 2) {
    if (lane == 0) status[b] = kBadLength;
    return;
  }
  uint32_t x = load_u32(blob + 4 * lane);
  const bool used = lane < channels;
  if (__any_sync(0xffffffffu, used ? x < KVC_RANS_L : x != KVC_RANS_L)) {
    if (lane == 0) status[b] = kBadState;
    return;
  }
  const uint8_t* words = blob + KVC_STATE_BYTES;
  const uint32_t n_words = (size - KVC_STATE_BYTES) / 2;
  const uint32_t below = (1u << lane) - 1;
  const int groups = (channels + KVC_LANES - 1) / KVC_LANES;
  uint8_t* dst = out + out_offsets[b];
  uint32_t pos = 0;
  bool truncated = false;
  // One state per lane for all groups: channel c always steps lane c % 32.
  for (uint32_t t = 0; t < rows[b] && !truncated; ++t) {
    for (int g = 0; g < groups; ++g) {
      const int c = g * KVC_LANES + lane;
      bool need = false;
      if (c < channels) {
        const uint32_t e = lut[(size_t)c * KVC_PROB_SCALE + kvc_dec_slot(x)];
        dst[(size_t)t * channels + c] = (uint8_t)kvc_dec_symbol(e);
        x = kvc_dec_advance(x, e);
        need = kvc_dec_needs_word(x);
      }
      const uint32_t mask = __ballot_sync(0xffffffffu, need);
      if (need) {
        const uint32_t p = pos + __popc(mask & below);
        if (p < n_words) {
          x = kvc_dec_refill(x, (uint16_t)(words[2 * p] | (words[2 * p + 1] << 8)));
        } else {
          truncated = true;
        }
      }
      pos += __popc(mask);
    }
    truncated = __any_sync(0xffffffffu, truncated);
  }
  const bool bad = __any_sync(0xffffffffu, used && x != KVC_RANS_L) || pos != n_words;
  if (lane == 0) status[b] = truncated ? kTruncated : bad ? kCorrupt : kOk;
}

}  // namespace kvc
