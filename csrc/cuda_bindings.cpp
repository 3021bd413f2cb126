// Python binding of the CUDA coder (module kvcodec._cuda, built only where nvcc exists).
// Like _native it takes no torch types: device pointers and the cudaStream_t arrive as
// integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream). Item arrays are
// staged from host memory into a caller-given device buffer on the caller's stream.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cuda_coder.h"
#include "common/rans.h"

namespace py = pybind11;
using kvc::gpu::DecodeItem;
using kvc::gpu::EncodeItem;

namespace {

template <typename T>
T* ptr(const py::handle& h) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(h.cast<uint64_t>()));
}

void check(int err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

// The launches take the item count as an int: more items are refused, not truncated.
int item_count(size_t n) {
  if (n > (size_t)INT_MAX) throw py::value_error("items: at most 2^31 - 1 per call");
  return (int)n;
}

template <typename Item>
void stage(const std::vector<Item>& host, uint64_t dev, uint64_t capacity, uint64_t stream) {
  const size_t bytes = host.size() * sizeof(Item);
  if (bytes > capacity) throw py::value_error("item buffer too small: need " + std::to_string(bytes));
  // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `host` may go.
  check((int)cudaMemcpyAsync(reinterpret_cast<void*>(dev), host.data(), bytes,
                             cudaMemcpyHostToDevice, reinterpret_cast<cudaStream_t>(stream)),
        "staging items");
}

// Bytes of the device buffer stage_decode fills for n items: the items, then the group
// starts of the shared-memory decode (at most n + 1).
uint64_t decode_buffer_bytes(uint64_t n) { return n * sizeof(DecodeItem) + 4 * (n + 1); }

// The DecodeItem fields as {name: (byte offset, NumPy format)}: the host builds its item
// records as a NumPy structured array in exactly this layout (kvcodec.integrations.cuda_stage).
py::dict decode_item_fields() {
  py::dict f;
#define KVC_FIELD(name, member, fmt) f[name] = py::make_tuple(offsetof(DecodeItem, member), fmt)
  KVC_FIELD("blob", blob, "u8");
  KVC_FIELD("size", size, "u4");
  KVC_FIELD("rows", rows, "i4");
  KVC_FIELD("channels", channels, "i4");
  KVC_FIELD("symbol_table", tables.symbol, "u8");
  KVC_FIELD("range_table", tables.range, "u8");
  KVC_FIELD("symbols", symbols, "u8");
  KVC_FIELD("dst", dst, "u8");
  KVC_FIELD("dtype", dtype, "i4");
  KVC_FIELD("heads", heads, "i4");
  KVC_FIELD("head_dim", head_dim, "i4");
  KVC_FIELD("half_range", half_range, "i4");
  KVC_FIELD("grid", grid, "u8");
  KVC_FIELD("mult", mult, "u8");
  KVC_FIELD("add", add, "u8");
  KVC_FIELD("cos", cos, "u8");
  KVC_FIELD("sin", sin, "u8");
  KVC_FIELD("stride_head", stride_head, "i8");
  KVC_FIELD("stride_token", stride_token, "i8");
  KVC_FIELD("stride_dim", stride_dim, "i8");
  KVC_FIELD("stride_block", stride_block, "i8");
  KVC_FIELD("slots", slots, "u8");
  KVC_FIELD("block_size", block_size, "i4");
  KVC_FIELD("first_row", first_row, "i4");
  KVC_FIELD("sink", sink, "u8");
#undef KVC_FIELD
  return f;
}

// items: DecodeItem records (a contiguous buffer of DECODE_ITEM_BYTES-sized records in
// the layout DECODE_ITEM_FIELDS gives; pointers as integers, 0 for null), checked and
// staged into items_dev with their groups (runs of items sharing one stream's tables).
// Returns (items, groups, largest channel count), what launch_decode takes.
py::tuple stage_decode(py::buffer items, uint64_t items_dev, uint64_t capacity, uint64_t stream) {
  const py::buffer_info info = items.request();
  if (info.ndim != 1 || info.itemsize != (py::ssize_t)sizeof(DecodeItem) ||
      (info.shape[0] > 1 && info.strides[0] != info.itemsize))
    throw py::value_error("items: a contiguous 1-d array of " +
                          std::to_string(sizeof(DecodeItem)) + "-byte DecodeItem records");
  std::vector<DecodeItem> host((size_t)info.shape[0]);
  if (!host.empty()) std::memcpy(host.data(), info.ptr, host.size() * sizeof(DecodeItem));
  for (const DecodeItem& it : host) {
    if (!it.dst) continue;
    if (it.slots && it.block_size < 1) throw py::value_error("block_size must be >= 1");
    // The kernel dequantizes rows [first_row, rows): a negative one would read symbols
    // and write values before the buffers' starts.
    if (it.first_row < 0) throw py::value_error("first_row must be >= 0");
  }
  const int n = item_count(host.size());
  std::vector<int32_t> groups{0};
  int max_channels = 0;
  for (int i = 0; i < n; ++i) {
    max_channels = std::max(max_channels, host[i].channels);
    if (i > 0 && (host[i].tables.range != host[i - 1].tables.range ||
                  host[i].channels != host[i - 1].channels ||
                  i - groups.back() == kvc::gpu::ITEMS_PER_GROUP))
      groups.push_back(i);
  }
  if (n > 0) groups.push_back(n);
  if (decode_buffer_bytes(host.size()) > capacity)
    throw py::value_error("item buffer too small: need " +
                          std::to_string(decode_buffer_bytes(host.size())));
  stage(host, items_dev, capacity, stream);
  stage(groups, items_dev + host.size() * sizeof(DecodeItem), 4 * groups.size(), stream);
  return py::make_tuple(n, (int)groups.size() - 1, max_channels);
}

// Launches the decode of n items staged at items_dev: no allocation, no host work, no
// sync, so a CUDA graph can capture it. Each stream's tables go to shared memory where
// they fit (`shared`, and the largest channel count allows it), else they are read from
// global memory.
void launch_decode(uint64_t items_dev, int n, int n_groups, int max_channels, uint64_t status,
                   uint64_t stream, bool shared) {
  const auto* items = reinterpret_cast<const DecodeItem*>(items_dev);
  auto* st = reinterpret_cast<int32_t*>(status);
  if (shared && n_groups > 0 && max_channels <= kvc::gpu::shared_decode_max_channels()) {
    const auto* groups = reinterpret_cast<const int32_t*>(items_dev + n * sizeof(DecodeItem));
    check(kvc::gpu::decode_shared(items, groups, n_groups, max_channels, st,
                                  reinterpret_cast<void*>(stream)),
          "decode launch");
    return;
  }
  check(kvc::gpu::decode(items, n, st, reinterpret_cast<void*>(stream)), "decode launch");
}

void encode(py::list items, uint64_t items_dev, uint64_t capacity, uint64_t sizes,
            uint64_t status, uint64_t stream) {
  std::vector<EncodeItem> host(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    py::dict d = items[i].cast<py::dict>();
    EncodeItem& it = host[i];
    it.symbols = ptr<const uint8_t>(d["symbols"]);
    it.rows = d["rows"].cast<int32_t>();
    it.channels = d["channels"].cast<int32_t>();
    it.range = ptr<const uint32_t>(d["range_table"]);
    it.scratch = ptr<uint16_t>(d["scratch"]);
    it.out = ptr<uint8_t>(d["out"]);
    it.capacity = d["capacity"].cast<uint64_t>();
  }
  const int n = item_count(host.size());
  stage(host, items_dev, capacity, stream);
  check(kvc::gpu::encode(reinterpret_cast<const EncodeItem*>(items_dev), n,
                         reinterpret_cast<uint64_t*>(sizes), reinterpret_cast<int32_t*>(status),
                         reinterpret_cast<void*>(stream)),
        "encode launch");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kvcodec CUDA coder: bitstream v1 on the GPU (device pointers as integers)";
  m.attr("DECODE_ITEM_BYTES") = sizeof(DecodeItem);
  m.attr("DECODE_ITEM_FIELDS") = decode_item_fields();
  m.attr("ENCODE_ITEM_BYTES") = sizeof(EncodeItem);
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
  m.def("build_tables", [](uint64_t freqs, int channels, int alphabet, uint64_t symbol,
                           uint64_t range, uint64_t stream) {
    check(kvc::gpu::build_tables(reinterpret_cast<const uint16_t*>(freqs), channels, alphabet,
                                 reinterpret_cast<uint8_t*>(symbol),
                                 reinterpret_cast<uint32_t*>(range),
                                 reinterpret_cast<void*>(stream)), "build_tables");
  });
  m.def("build_range", [](uint64_t freqs, int channels, int alphabet, uint64_t range,
                          uint64_t stream) {
    check(kvc::gpu::build_range(reinterpret_cast<const uint16_t*>(freqs), channels, alphabet,
                                reinterpret_cast<uint32_t*>(range),
                                reinterpret_cast<void*>(stream)), "build_range");
  });
  m.attr("SHARED_DECODE_MAX_CHANNELS") = kvc::gpu::shared_decode_max_channels();
  m.def("decode_buffer_bytes", &decode_buffer_bytes, py::arg("n"));
  m.def("stage_decode", &stage_decode, py::arg("items"), py::arg("items_dev"),
        py::arg("capacity"), py::arg("stream"));
  m.def("launch_decode", &launch_decode, py::arg("items_dev"), py::arg("n"), py::arg("n_groups"),
        py::arg("max_channels"), py::arg("status"), py::arg("stream"), py::arg("shared") = true);
  m.def("encode", &encode, py::arg("items"), py::arg("items_dev"), py::arg("capacity"),
        py::arg("sizes"), py::arg("status"), py::arg("stream"));
}
