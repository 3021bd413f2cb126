// Which way a SIMD decode path reads its tables fastest on this CPU, measured: a 256-bit
// or 512-bit gather is one instruction, but how fast it runs varies more between CPUs
// than any other instruction the decoder uses. Zen 1 and 2 split it into many micro-ops,
// and on a Zen 3 EPYC scalar loads were 1.11-1.13x faster; on a 2-core Intel Xeon VM
// (AVX-512, no AMX) they were 1.6-2.2x faster on the AVX2 path and 1.24-1.43x on the
// AVX-512 one (bench_entropy), though the CPU is no model a list would name. So a path's
// first decode in a process decodes a small synthetic stream both ways (decoder.cpp keeps
// the faster; a probe that fails reports zeros, and gathers are kept): ~2 ms, once.
#include <stdint.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "../common/rans.h"
#include "../encoder/encoder.h"
#include "decoder.h"
#include "group.h"

namespace kvc {

namespace {

// Eight blobs of four streams, decoded together as a file's chunk decodes them (each
// stream's tables read in turn: with one stream the probe saw half the gap a real decode
// shows); ~1.8 bits per symbol, as the shipped configs code real KV.
constexpr int ROWS = 64, CHANNELS = 128, BLOBS = 8, STREAMS = 4, ROUNDS = 3;

// Symbols as quantized KV gives them: most in the middle of the alphabet, two-sided
// geometric, half the channels at ~1.3 bits, half at ~2.5.
std::vector<uint8_t> synthetic_symbols(uint32_t seed) {
  std::vector<uint8_t> s((size_t)ROWS * CHANNELS);
  uint32_t x = seed;
  for (int t = 0; t < ROWS; ++t)
    for (int c = 0; c < CHANNELS; ++c) {
      int v = 0;
      const uint32_t stop = c % 2 ? 0x80000000u : 0xC0000000u;  // P(stop): 1/2 or 3/4
      for (;;) {
        x = x * 1664525u + 1013904223u;
        if (x < stop || v == 100) break;
        ++v;
      }
      x = x * 1664525u + 1013904223u;
      s[(size_t)t * CHANNELS + c] = (uint8_t)(128 + ((x >> 31) ? v : -v));
    }
  return s;
}

}  // namespace

GatherProbe probe_gather(void (*decode)(BlobTask*, size_t, bool)) {
  std::vector<DecodeTables> tables(STREAMS);
  std::vector<std::vector<uint8_t>> blobs(STREAMS);
  for (int st = 0; st < STREAMS; ++st) {
    const std::vector<uint8_t> symbols = synthetic_symbols(12345 + st);
    std::vector<uint16_t> freqs((size_t)CHANNELS * MAX_ALPHABET);
    std::vector<uint32_t> cums((size_t)CHANNELS * MAX_ALPHABET);
    std::vector<uint8_t> spans((size_t)CHANNELS * 2), codes;
    if (!stream_tables(symbols.data(), ROWS, CHANNELS, MAX_ALPHABET, nullptr, freqs.data(),
                       spans.data(), &codes).empty())
      return GatherProbe{};
    cumulative(freqs.data(), CHANNELS, MAX_ALPHABET, cums.data());
    if (!encode_blob(symbols.data(), ROWS, CHANNELS, freqs.data(), cums.data(), MAX_ALPHABET,
                     &blobs[st]).empty())
      return GatherProbe{};
    build_tables(freqs.data(), CHANNELS, MAX_ALPHABET, &tables[st]);
  }
  std::vector<uint8_t> out((size_t)BLOBS * ROWS * CHANNELS);
  std::vector<BlobTask> tasks(BLOBS);
  for (int b = 0; b < BLOBS; ++b) {
    const int st = b * STREAMS / BLOBS;
    tasks[b] = BlobTask{blobs[st].data(), blobs[st].size(), ROWS, CHANNELS, &tables[st],
                        out.data() + (size_t)b * ROWS * CHANNELS, {}};
  }
  double best[2] = {1e30, 1e30};
  for (int r = 0; r <= ROUNDS; ++r)  // round 0 warms the caches and is not counted
    for (int loads = 0; loads < 2; ++loads) {
      const auto t0 = std::chrono::steady_clock::now();
      decode(tasks.data(), tasks.size(), loads);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                            .count();
      for (const BlobTask& t : tasks)
        if (!t.error.empty()) return GatherProbe{};
      if (r) best[loads] = std::min(best[loads], dt);
    }
  return GatherProbe{best[0], best[1]};
}

}  // namespace kvc
