// Python binding of the CUDA coder (module kvcodec._cuda, built only where nvcc exists).
// Like _native it takes no torch types: device pointers and the cudaStream_t arrive as
// integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream). Item arrays are
// staged from host memory into a caller-given device buffer on the caller's stream.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
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

// items: list of dicts with the DecodeItem fields (pointers as ints, 0 for null), staged
// into items_dev with their groups (runs of items sharing one stream's tables).
// Returns (items, groups, largest channel count), what launch_decode takes.
py::tuple stage_decode(py::list items, uint64_t items_dev, uint64_t capacity, uint64_t stream) {
  std::vector<DecodeItem> host(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    py::dict d = items[i].cast<py::dict>();
    DecodeItem& it = host[i];
    it.blob = ptr<const uint8_t>(d["blob"]);
    it.size = d["size"].cast<uint32_t>();
    it.rows = d["rows"].cast<int32_t>();
    it.channels = d["channels"].cast<int32_t>();
    it.tables.symbol = ptr<const uint8_t>(d["symbol_table"]);
    it.tables.range = ptr<const uint32_t>(d["range_table"]);
    it.symbols = ptr<uint8_t>(d["symbols"]);
    it.dst = d.contains("dst") ? ptr<void>(d["dst"]) : nullptr;
    if (it.dst) {
      it.dtype = d["dtype"].cast<int32_t>();
      it.heads = d["heads"].cast<int32_t>();
      it.head_dim = d["head_dim"].cast<int32_t>();
      it.half_range = d["half_range"].cast<int32_t>();
      it.grid = ptr<const float>(d["grid"]);
      it.mult = ptr<const float>(d["mult"]);
      it.add = d.contains("add") ? ptr<const float>(d["add"]) : nullptr;
      it.cos = ptr<const float>(d["cos"]);
      it.sin = ptr<const float>(d["sin"]);
      it.stride_head = d["stride_head"].cast<int64_t>();
      it.stride_token = d["stride_token"].cast<int64_t>();
      it.stride_dim = d["stride_dim"].cast<int64_t>();
      it.stride_block = d.contains("stride_block") ? d["stride_block"].cast<int64_t>() : 0;
      it.slots = d.contains("slots") ? ptr<const int64_t>(d["slots"]) : nullptr;
      it.block_size = d.contains("block_size") ? d["block_size"].cast<int32_t>() : 1;
      it.first_row = d.contains("first_row") ? d["first_row"].cast<int32_t>() : 0;
      if (it.slots && it.block_size < 1) throw py::value_error("block_size must be >= 1");
      // The kernel dequantizes rows [first_row, rows): a negative one would read symbols
      // and write values before the buffers' starts.
      if (it.first_row < 0) throw py::value_error("first_row must be >= 0");
    }
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
