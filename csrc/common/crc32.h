// CRC-32 as zlib computes it (the .kvc container's item checksums: zlib.crc32 in Python),
// 16 bytes per step by carry-less multiplication where the CPU has it.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace kvc {

// zlib's crc32(crc, data, n): the checksum of data continuing `crc` (0 to start).
uint32_t crc32(uint32_t crc, const uint8_t* data, size_t n);

}  // namespace kvc
