// kvcodec interleaved rANS: what the encoder and every decoder (CPU, CUDA) must agree on.
// Everything here is KVC_HD inline so the CPU tests exercise the exact step logic the
// GPU coder runs.
//
// Bitstream v1. A "blob" codes a uint8 symbol matrix S[T][C] (1 <= C <= 65535), row-major,
// with one frequency table per channel: freqs[C][A], A <= 256, each row summing to 4096.
//   * 32-bit states, lower bound L = 2^16, renormalization in 16-bit words,
//     probabilities in 1/4096.
//   * Channel c is coded by lane c % 32 in group g = c / 32. Decode order: steps (t, g),
//     t outer, g inner; inside a step the active lanes (g*32 + j < C) ascending. A lane
//     whose state drops below L after its symbol reads the next word of ONE shared forward
//     word stream, so a warp decodes a step with one ballot + prefix count (DietGPU).
//   * Blob = 32 little-endian u32 lane states (lane 0 first; the decoder's initial
//     states) followed by the u16 LE word stream. Encoder lanes start at L and run the
//     steps in exact reverse, so a correct decode ends with every used lane back at L and
//     every word consumed: that is the integrity check against damaged blobs.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define KVC_HD __host__ __device__
#else
#define KVC_HD
#endif

constexpr int KVC_PROB_BITS = 12;
constexpr uint32_t KVC_PROB_SCALE = 1u << KVC_PROB_BITS;
constexpr uint32_t KVC_PROB_MASK = KVC_PROB_SCALE - 1;
constexpr int KVC_LANES = 32;
constexpr uint32_t KVC_RANS_L = 1u << 16;
constexpr int KVC_MAX_ALPHABET = 256;
constexpr int KVC_MAX_CHANNELS = 65535;
constexpr int KVC_MAX_LEVEL = 63;
constexpr int KVC_BITSTREAM_VERSION = 1;
constexpr int KVC_STATE_BYTES = KVC_LANES * 4;

// ---- frequency tables from levels ------------------------------------------------------
// Level k (1..63) -> weight round(2^(16 + (k - 63)/4 + 15.5)): a quarter-octave scale, so a
// table is stored as one small byte per symbol. Level 0 = absent. Generated with Python:
//   [0] + [round(2 ** (16 + (k - 63) / 4.0 + 15.5)) for k in range(1, 64)]
// A function-local table (not a namespace-scope array) so device code may read it too.
KVC_HD inline uint32_t kvc_level_weight(int level) {
  constexpr uint32_t W[64] = {
      0u, 65536u, 77936u, 92682u, 110218u, 131072u, 155872u, 185364u,
      220436u, 262144u, 311744u, 370728u, 440872u, 524288u, 623487u, 741455u,
      881744u, 1048576u, 1246974u, 1482910u, 1763488u, 2097152u, 2493948u, 2965821u,
      3526975u, 4194304u, 4987896u, 5931642u, 7053950u, 8388608u, 9975792u, 11863283u,
      14107901u, 16777216u, 19951585u, 23726566u, 28215802u, 33554432u, 39903169u, 47453133u,
      56431603u, 67108864u, 79806339u, 94906266u, 112863206u, 134217728u, 159612677u,
      189812531u, 225726413u, 268435456u, 319225354u, 379625062u, 451452825u, 536870912u,
      638450708u, 759250125u, 902905651u, 1073741824u, 1276901417u, 1518500250u,
      1805811301u, 2147483648u, 2553802834u, 3037000500u};
  return W[level & 63];
}

// levels[A] -> freqs[A] summing to exactly 4096, integer arithmetic only, so the CPU and
// CUDA coders (and Python, through the binding) derive bit-identical tables.
//   total = sum W[level];  f_s = max(1, floor(W[level_s] * 4096 / total)) if level_s > 0
//   d = 4096 - sum f: if d > 0 the largest f (lowest index on ties) takes all of d; while
//   d < 0 the largest f (lowest index on ties) gives min(-d, f - 1), repeated.
// d < 0 comes only from the +1s of rare symbols, and A <= 256 < 4096 keeps it solvable.
// Returns false (freqs unspecified) if no symbol is present, a level exceeds 63 or A is
// outside [1, 256].
KVC_HD inline bool kvc_normalize_freqs(const uint8_t* levels, int A, uint16_t* freqs) {
  if (A < 1 || A > KVC_MAX_ALPHABET) return false;
  uint64_t total = 0;
  for (int s = 0; s < A; ++s) {
    if (levels[s] > KVC_MAX_LEVEL) return false;
    total += kvc_level_weight(levels[s]);
  }
  if (total == 0) return false;
  int32_t sum = 0;
  for (int s = 0; s < A; ++s) {
    uint32_t f = 0;
    if (levels[s]) {
      f = (uint32_t)((uint64_t)kvc_level_weight(levels[s]) * KVC_PROB_SCALE / total);
      if (f == 0) f = 1;
    }
    freqs[s] = (uint16_t)f;  // <= 4096
    sum += (int32_t)f;
  }
  int32_t d = (int32_t)KVC_PROB_SCALE - sum;
  while (d != 0) {
    int best = 0;
    for (int s = 1; s < A; ++s)
      if (freqs[s] > freqs[best]) best = s;
    if (d > 0) {
      freqs[best] = (uint16_t)(freqs[best] + d);
      d = 0;
    } else {
      int32_t take = (int32_t)freqs[best] - 1;
      if (take <= 0) return false;  // unreachable for A <= 256; guards the loop anyway
      if (take > -d) take = -d;
      freqs[best] = (uint16_t)(freqs[best] - take);
      d += take;
    }
  }
  return true;
}

// ---- encoder step ----------------------------------------------------------------------
// Codes one symbol (freq > 0, cum = its cumulative start) into lane state *x. Returns true
// and sets *word when a 16-bit word was pushed (the caller appends it to its reversed
// word list). The bound is 64-bit because freq == 4096 (a one-symbol table) makes it 2^32.
KVC_HD inline bool kvc_enc_step(uint32_t* x, uint32_t freq, uint32_t cum, uint16_t* word) {
  const uint64_t x_max = (uint64_t)((KVC_RANS_L >> KVC_PROB_BITS) << 16) * freq;
  bool pushed = false;
  if ((uint64_t)*x >= x_max) {
    *word = (uint16_t)(*x & 0xffff);
    *x >>= 16;
    pushed = true;
  }
  *x = ((*x / freq) << KVC_PROB_BITS) + (*x % freq) + cum;
  return pushed;
}

// ---- decoder step ----------------------------------------------------------------------
// A decoder table entry packs what one slot needs into 32 bits:
//   bits 0..7 symbol, 8..19 freq - 1, 20..31 slot - cum   (freq <= 4096, slot - cum < freq)
// so a step is one load, one multiply-add and the refill test.
KVC_HD inline uint32_t kvc_dec_entry(uint32_t symbol, uint32_t freq, uint32_t slot_minus_cum) {
  return symbol | ((freq - 1) << 8) | (slot_minus_cum << 20);
}

KVC_HD inline uint32_t kvc_dec_slot(uint32_t x) { return x & KVC_PROB_MASK; }

KVC_HD inline uint32_t kvc_dec_symbol(uint32_t entry) { return entry & 0xff; }

// x' = freq * (x >> 12) + slot - cum. For x < 2^32 this is < freq * 2^20 <= 2^32: no
// overflow, and x >= L keeps x' >= 16, so one refill always brings it back to >= L.
KVC_HD inline uint32_t kvc_dec_advance(uint32_t x, uint32_t entry) {
  return (((entry >> 8) & 0xfff) + 1) * (x >> KVC_PROB_BITS) + (entry >> 20);
}

KVC_HD inline bool kvc_dec_needs_word(uint32_t x) { return x < KVC_RANS_L; }

KVC_HD inline uint32_t kvc_dec_refill(uint32_t x, uint16_t word) { return (x << 16) | word; }

// A step pushes at most one word: a lane state is < 2^32 before renormalization and
// < 2^16 <= x_max after one shift. So words <= T * C exactly; no further slack is needed.
KVC_HD inline uint64_t kvc_max_encoded_size(uint64_t tokens, uint64_t channels) {
  return (uint64_t)KVC_STATE_BYTES + 2ull * tokens * channels;
}
