// The one Python binding of the native coder. Arrays come in as NumPy buffers and are
// checked here, at the boundary, with messages that name the argument; the coder itself
// never sees Python objects and runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/crc32.h"
#include "common/jobs.h"
#include "common/rans.h"
#include "decoder/decoder.h"
#include "decoder/dequant.h"

namespace py = pybind11;

namespace {

// Lifetimes. The coder runs without the GIL on raw pointers, so everything they point
// into must stay alive, unchanged in place, until it returns. A Python object the caller
// passed in a list or tuple is only borrowed: another thread may drop the caller's last
// reference meanwhile, and `x.cast<py::array>()` of something that is not already an
// array (a list, an object with __array__) makes a temporary array that dies with the
// local holding it. Each call therefore keeps a reference to every object whose memory
// the coder reads (Keep) for the whole call, and takes outputs only as the caller's own
// NumPy arrays (output_array), never converted: a converted output is a copy the caller
// would not see, freed before the decode writes to it.
using Keep = std::vector<py::object>;

// An int dimension of the coder (rows, channels), refused rather than truncated by a
// cast when an array is larger.
int int_dim(py::ssize_t n, const std::string& name) {
  if (n < 0 || n > INT_MAX) {
    throw py::value_error(name + ": " + std::to_string(n) + " is out of range (at most " +
                          std::to_string(INT_MAX) + ")");
  }
  return (int)n;
}

// The caller's array `o` itself, to be written to (checked further by the caller).
py::array output_array(const py::handle& o, const char* name) {
  if (!py::isinstance<py::array>(o)) {
    throw py::value_error(std::string(name) + ": expected a NumPy array to write to, got " +
                          std::string(py::str(py::type::handle_of(o))));
  }
  return py::reinterpret_borrow<py::array>(o);
}

void check_array(const py::array& a, const char* name, char kind, int itemsize, int ndim) {
  if (a.dtype().kind() != kind || a.itemsize() != itemsize) {
    throw py::value_error(std::string(name) + ": expected dtype " +
                          (kind == 'u' && itemsize == 1 ? "uint8" : "uint16") + ", got " +
                          std::string(py::str(a.dtype())));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                          " dimensions, got " + std::to_string(a.ndim()));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": must be C-contiguous");
  }
}

kvc::FreqTable check_freqs(const py::array& freqs, const char* name, int channels) {
  check_array(freqs, name, 'u', 2, 2);
  const int c = int_dim(freqs.shape(0), name), a = int_dim(freqs.shape(1), name);
  if (c != channels) {
    throw py::value_error(std::string(name) + ": has " + std::to_string(c) +
                          " rows but the symbols have " + std::to_string(channels) + " channels");
  }
  if (a < 1 || a > kvc::MAX_ALPHABET) {
    throw py::value_error(std::string(name) + ": alphabet must be in [1, 256]");
  }
  const uint16_t* f = static_cast<const uint16_t*>(freqs.data());
  for (int i = 0; i < c; ++i) {
    uint32_t sum = 0;
    for (int s = 0; s < a; ++s) sum += f[(size_t)i * a + s];
    if (sum != kvc::PROB_SCALE) {
      throw py::value_error(std::string(name) + ": row " + std::to_string(i) + " sums to " +
                            std::to_string(sum) + ", not " + std::to_string(kvc::PROB_SCALE));
    }
  }
  return {f, c, a};
}

kvc::EncodeJob check_encode(const py::array& symbols, const py::array& freqs,
                            int chunk_tokens) {
  check_array(symbols, "symbols", 'u', 1, 2);
  if (symbols.shape(1) < 1 || symbols.shape(1) > 65535) {
    throw py::value_error("symbols: channels must be in [1, 65535]");
  }
  if (chunk_tokens < 1) throw py::value_error("chunk_tokens must be >= 1");
  kvc::EncodeJob job;
  job.symbols = static_cast<const uint8_t*>(symbols.data());
  job.rows = int_dim(symbols.shape(0), "symbols: rows");
  job.channels = (int)symbols.shape(1);
  job.table = check_freqs(freqs, "freqs", job.channels);
  return job;
}

py::list blobs_to_python(const kvc::EncodeResult& result) {
  if (!result.error.empty()) throw py::value_error("symbols: " + result.error);
  py::list out;
  for (const auto& b : result.blobs) {
    out.append(py::bytes(reinterpret_cast<const char*>(b.data()), b.size()));
  }
  return out;
}

py::list encode_many(py::list items, int chunk_tokens, int threads) {
  std::vector<kvc::EncodeJob> jobs;
  jobs.reserve(items.size());
  Keep keep;  // the (possibly converted) inputs, read with the GIL released
  for (size_t i = 0; i < items.size(); ++i) {
    py::tuple item = items[i].cast<py::tuple>();
    if (item.size() != 2) throw py::value_error("items: each item is (symbols, freqs)");
    py::array symbols = item[0].cast<py::array>(), freqs = item[1].cast<py::array>();
    keep.insert(keep.end(), {symbols, freqs});
    jobs.push_back(check_encode(symbols, freqs, chunk_tokens));
  }
  std::vector<kvc::EncodeResult> results(jobs.size());
  {
    py::gil_scoped_release release;
    kvc::encode_many(jobs.data(), jobs.size(), chunk_tokens, threads, results.data());
  }
  py::list out;
  for (const auto& result : results) out.append(blobs_to_python(result));
  return out;
}

// Decode tables built once per stream of a file and reused by every decode call on it
// (a chunk-by-chunk decode would otherwise rebuild ~1 MB of tables per stream per chunk).
struct Tables {
  kvc::DecodeTables t;
  int channels = 0, alphabet = 0;
};

std::vector<std::shared_ptr<Tables>> build_decode_tables(py::list freqs, int threads) {
  std::vector<kvc::FreqTable> specs;
  Keep keep;  // the (possibly converted) tables, read with the GIL released
  for (size_t i = 0; i < freqs.size(); ++i) {
    const py::array a = freqs[i].cast<py::array>();
    keep.push_back(a);
    const int channels = a.ndim() == 2 ? int_dim(a.shape(0), "freqs") : 0;
    specs.push_back(check_freqs(a, "freqs", channels));
  }
  std::vector<std::shared_ptr<Tables>> out;
  std::vector<kvc::DecodeTables*> targets;
  for (const auto& spec : specs) {
    out.push_back(std::make_shared<Tables>());
    out.back()->channels = spec.channels;
    out.back()->alphabet = spec.alphabet;
    targets.push_back(&out.back()->t);
  }
  {
    py::gil_scoped_release release;
    kvc::build_decode_tables(specs.data(), specs.size(), threads, targets.data());
  }
  return out;
}

// What a decode job points into, held while the GIL is released: the buffers of its
// blobs, and in `hold` its item, tables, output and dequantizer arguments.
struct DecodeArgs {
  std::vector<kvc::Blob> blobs;
  std::vector<py::buffer_info> keep;
  std::shared_ptr<Tables> built;
  kvc::DequantSpec dequant;
  Keep hold;
};

// The array must already be a NumPy array (never a converted temporary); the call holds
// the tuple it came from while the GIL is released.
const float* float_data(const py::object& o, const char* name, size_t count) {
  if (!py::isinstance<py::array>(o)) {
    throw py::value_error(std::string(name) + ": expected a NumPy float32 array");
  }
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (a.dtype().kind() != 'f' || a.itemsize() != 4 || !(a.flags() & py::array::c_style) ||
      (size_t)a.size() != count) {
    throw py::value_error(std::string(name) + ": expected a C-contiguous float32 array of " +
                          std::to_string(count) + " values");
  }
  return static_cast<const float*>(a.data());
}

// A writable [heads, rows, head_dim] array, float32 or uint16 (bfloat16 bits), its
// channels contiguous; heads and rows any distance apart that keeps them from
// overlapping ([heads, rows, head_dim] slices of a longer cache, or [rows, heads,
// head_dim] transposed), into spec's out / out_bf16, head_stride and row_stride.
// The checked, writable array `a` as the dequantizer's output: uint16 bfloat16 bits
// (`bf16`) or float32.
void set_out(py::array& a, bool bf16, kvc::DequantSpec* spec) {
  if (bf16) {
    spec->out_bf16 = static_cast<uint16_t*>(a.mutable_data());
  } else {
    spec->out = static_cast<float*>(a.mutable_data());
  }
}

// Where each channel sits from its row's head start (chan_at: int64 [head_dim], each in
// [0, n)), and the form the AVX2 dequantizer stores fast (chan_zip); returns the
// farthest place.
py::ssize_t chan_table(const py::array& t, py::ssize_t n, kvc::DequantSpec* spec) {
  const int d = spec->head_dim;
  if (t.dtype().kind() != 'i' || t.itemsize() != 8 || t.ndim() != 1 || t.shape(0) != d ||
      !(t.flags() & py::array::c_style)) {
    throw py::value_error("dequant chan_at: expected a C-contiguous int64 array of " +
                          std::to_string(d) + " channels");
  }
  const int64_t* c = static_cast<const int64_t*>(t.data());
  bool pairs = d % 8 == 0, eights = d % 8 == 0;
  py::ssize_t last = 0;
  for (int i = 0; i < d; ++i) {
    if (c[i] < 0 || c[i] >= n) throw py::value_error("dequant chan_at: out of the output");
    last = c[i] > last ? (py::ssize_t)c[i] : last;
    if (i % 2) pairs = pairs && c[i] == c[i - 1] + 1;
    if (i % 8) eights = eights && c[i] == c[i - 1] + 2;
  }
  spec->chan_at = c;
  spec->chan_zip = pairs ? kvc::ZIP_CHANNELS : eights ? kvc::ZIP_ROWS : 0;
  return last;
}

// Rows placed one by one (`row_at`): (flat, head_stride, chan, row_at), a writable 1-D
// float32 or uint16 (bfloat16) array and, per row, where its head 0 starts in it (in
// elements; negative: not stored); `chan` the elements from one channel to the next, or
// an int64 array of where each channel sits from its row's head start (chan_table).
// Every element a kept row writes is checked to lie in `flat`; rows that overlap are the
// caller's to avoid.
void placed_out(const py::tuple& p, int rows, kvc::DequantSpec* spec) {
  if (p.size() != 4) {
    throw py::value_error("dequant out: expected an array or (flat, head_stride, "
                          "chan, row_at)");
  }
  py::array a = output_array(p[0], "dequant out");
  const bool bf16 = a.dtype().kind() == 'u' && a.itemsize() == 2;
  if (!(bf16 || (a.dtype().kind() == 'f' && a.itemsize() == 4)) || a.ndim() != 1 ||
      a.strides(0) != a.itemsize() || !a.writeable()) {
    throw py::value_error("dequant out: expected a writable contiguous 1-D float32 or "
                          "uint16 (bfloat16) array");
  }
  const py::ssize_t hs = p[1].cast<py::ssize_t>();
  py::ssize_t cs = 0, last = 0;  // last: channel head_dim - 1's place from its row's head
  if (py::isinstance<py::array>(p[2])) {
    last = chan_table(p[2].cast<py::array>(), a.shape(0), spec);
  } else {
    cs = p[2].cast<py::ssize_t>();
    last = (py::ssize_t)(spec->head_dim - 1) * (cs > 1 ? cs : 1);
  }
  if (hs < 0 || cs < 0 || hs > a.shape(0) || cs > a.shape(0)) {
    throw py::value_error("dequant out: strides must be in [0, the output's size]");
  }
  py::array at = output_array(p[3], "dequant row_at");
  if (at.dtype().kind() != 'i' || at.itemsize() != 8 || at.ndim() != 1 ||
      at.shape(0) != rows || !(at.flags() & py::array::c_style)) {
    throw py::value_error("dequant row_at: expected a C-contiguous int64 array of " +
                          std::to_string(rows) + " rows");
  }
  const int64_t* r = static_cast<const int64_t*>(at.data());
  const int64_t n = (int64_t)a.shape(0);
  // A row's last element: head (heads - 1), its farthest channel.
  const int64_t reach = (int64_t)(spec->heads - 1) * hs + (int64_t)last;
  for (int i = 0; i < rows; ++i) {
    if (r[i] >= 0 && (r[i] >= n || reach >= n - r[i])) {
      throw py::value_error("dequant row_at: row " + std::to_string(i) +
                            " would be written past the end of the output");
    }
  }
  spec->head_stride = (size_t)hs;
  spec->chan_stride = (size_t)cs;
  spec->row_at = r;
  set_out(a, bf16, spec);
}

void strided_out(const py::object& o, int rows, kvc::DequantSpec* spec) {
  if (py::isinstance<py::tuple>(o)) return placed_out(o.cast<py::tuple>(), rows, spec);
  py::array a = output_array(o, "dequant out");
  const int heads = spec->heads, d = spec->head_dim;
  const bool bf16 = a.dtype().kind() == 'u' && a.itemsize() == 2;
  const py::ssize_t f = a.itemsize();
  if (!(bf16 || (a.dtype().kind() == 'f' && f == 4)) || a.ndim() != 3 ||
      a.shape(0) != heads || a.shape(1) != rows || a.shape(2) != d) {
    throw py::value_error("dequant out: expected float32 or uint16 (bfloat16) [" +
                          std::to_string(heads) + ", " + std::to_string(rows) + ", " +
                          std::to_string(d) + "]");
  }
  const py::ssize_t hs = a.strides(0), rs = a.strides(1);
  // Heads apart by at least a head's rows, or rows apart by at least a row's heads.
  const bool apart =
      (heads == 1 || hs >= (rows > 1 ? (rows - 1) * rs : 0) + f * d) &&
      (rows == 1 || rs >= f * d);
  const bool across = (rows == 1 || rs >= (heads - 1) * hs + f * d) &&
                      (heads == 1 || hs >= f * d);
  if (a.strides(2) != f || hs < 0 || rs < 0 || hs % f || rs % f || !(apart || across)) {
    throw py::value_error("dequant out: channels must be contiguous and heads and rows "
                          "must not overlap");
  }
  if (!a.writeable()) throw py::value_error("dequant out: must be writable");
  spec->head_stride = (size_t)(hs / f);
  spec->row_stride = (size_t)(rs / f);
  if (rows == 1) spec->row_stride = (size_t)d;
  set_out(a, bf16, spec);
}

// (grid [256], mult [C], R, heads, out [heads, rows, head_dim], cos, sin[, add [C][,
// add_rows]]) -> spec; with add_rows > 0, add is [ceil(rows / add_rows), C]. The caller
// holds `d` (which holds the arrays) until the decode has run.
kvc::DequantSpec check_dequant(const py::tuple& d, int rows, int channels) {
  if (d.size() < 7 || (d.size() > 10 && d.size() != 13)) {
    throw py::value_error("dequant: expected (grid, mult, half_range, heads, out, cos, sin[, "
                          "add[, add_rows[, basis[, sinks, sink_every, sink_rows]]]])");
  }
  kvc::DequantSpec spec{};
  spec.half_range = d[2].cast<int>();
  spec.heads = d[3].cast<int>();
  if (spec.half_range < 0 || spec.half_range > 127) {
    throw py::value_error("dequant: half_range must be in [0, 127]");
  }
  if (spec.heads < 1 || (channels - 1) % spec.heads) {
    throw py::value_error("dequant: heads must divide the value channels");
  }
  spec.head_dim = (channels - 1) / spec.heads;
  spec.grid = float_data(d[0], "dequant grid", 256);
  spec.mult = float_data(d[1], "dequant mult", (size_t)channels - 1);
  if (d.size() >= 9) {
    spec.add_rows = d[8].cast<int>();
    if (spec.add_rows < 0) throw py::value_error("dequant: add_rows must be >= 0");
  }
  if (d.size() >= 8 && !d[7].is_none()) {
    const size_t blocks = spec.add_rows ? ((size_t)rows + spec.add_rows - 1) / spec.add_rows : 1;
    spec.add = float_data(d[7], "dequant add", std::max<size_t>(blocks, 1) * (channels - 1));
  }
  if (d.size() >= 10 && !d[9].is_none()) {
    spec.basis = float_data(d[9], "dequant basis",
                            (size_t)spec.heads * spec.head_dim * spec.head_dim);
  }
  if (d.size() == 13 && !d[10].is_none()) {  // sink rows: sink_rows of every sink_every
    spec.sink_every = d[11].cast<int>();
    spec.sink_rows = d[12].cast<int>();
    if (spec.sink_every < 0 || spec.sink_rows < 0 ||
        (spec.sink_every && spec.sink_rows > spec.sink_every)) {
      throw py::value_error("dequant: sink_rows must be in [0, sink_every]");
    }
    const size_t blocks =
        spec.sink_every ? ((size_t)rows + spec.sink_every - 1) / spec.sink_every : 1;
    spec.sinks = float_data(d[10], "dequant sinks",
                            std::max<size_t>(blocks, 1) * spec.sink_rows * (channels - 1));
  }
  strided_out(d[4], rows, &spec);
  if (!d[5].is_none()) {
    if (spec.head_dim % 2) throw py::value_error("dequant: RoPE needs an even head_dim");
    spec.cos = float_data(d[5], "dequant cos", (size_t)rows * spec.head_dim);
    spec.sin = float_data(d[6], "dequant sin", (size_t)rows * spec.head_dim);
  }
  return spec;
}

py::list decode_many(py::list items, int chunk_tokens, int threads) {
  if (chunk_tokens < 1) throw py::value_error("chunk_tokens must be >= 1");
  std::vector<kvc::DecodeJob> jobs(items.size());
  std::vector<DecodeArgs> args(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    py::tuple item = items[i].cast<py::tuple>();
    if (item.size() != 3 && item.size() != 4) {
      throw py::value_error("items: each item is (blobs, freqs, out[, dequant])");
    }
    kvc::DecodeJob& job = jobs[i];
    DecodeArgs& arg = args[i];
    arg.hold.push_back(item);
    const bool fused = item.size() == 4 && !item[3].is_none();
    if (fused && py::isinstance<py::tuple>(item[2])) {  // (rows, channels): symbols not kept
      py::tuple shape = item[2].cast<py::tuple>();
      if (shape.size() != 2) throw py::value_error("out: expected an array or (rows, channels)");
      job.rows = shape[0].cast<int>();
      job.channels = shape[1].cast<int>();
      if (job.rows < 0) throw py::value_error("out: rows must be >= 0");
      job.out = nullptr;
    } else {
      py::array out = output_array(item[2], "out");
      check_array(out, "out", 'u', 1, 2);
      if (!out.writeable()) throw py::value_error("out: must be writable");
      job.rows = int_dim(out.shape(0), "out: rows");
      job.channels = int_dim(out.shape(1), "out: channels");
      job.out = static_cast<uint8_t*>(out.mutable_data());
      arg.hold.push_back(out);
    }
    if (job.channels < 1 || job.channels > 65535) {
      throw py::value_error("out: channels must be in [1, 65535]");
    }
    if (py::isinstance<Tables>(item[1])) {
      arg.built = item[1].cast<std::shared_ptr<Tables>>();
      if (arg.built->channels != job.channels) {
        throw py::value_error("tables: built for " + std::to_string(arg.built->channels) +
                              " channels but the symbols have " +
                              std::to_string(job.channels));
      }
      job.built = &arg.built->t;
    } else {
      py::array freqs = item[1].cast<py::array>();
      arg.hold.push_back(freqs);
      job.table = check_freqs(freqs, "freqs", job.channels);
    }
    if (fused) {
      py::tuple d = item[3].cast<py::tuple>();
      arg.hold.push_back(d);
      arg.dequant = check_dequant(d, job.rows, job.channels);
      job.dequant = &arg.dequant;
    }
    py::list blobs = item[0].cast<py::list>();
    const size_t expected = kvc::chunk_count(job.rows, chunk_tokens);
    if (blobs.size() != expected) {
      throw py::value_error("blobs: " + std::to_string(blobs.size()) + " blobs for " +
                            std::to_string(job.rows) + " rows; expected " +
                            std::to_string(expected));
    }
    for (auto b : blobs) {
      py::buffer buf = py::reinterpret_borrow<py::buffer>(b);
      py::buffer_info info = buf.request();
      if (info.itemsize != 1 || info.ndim != 1 || info.strides[0] != 1) {
        throw py::value_error("blobs: each blob must be a contiguous byte buffer");
      }
      arg.blobs.push_back({static_cast<const uint8_t*>(info.ptr), (size_t)info.size});
      arg.keep.push_back(std::move(info));
    }
    job.blobs = arg.blobs.data();
    job.n_blobs = arg.blobs.size();
  }
  std::vector<std::string> errors(jobs.size());
  {
    py::gil_scoped_release release;
    kvc::decode_many(jobs.data(), jobs.size(), chunk_tokens, threads, errors.data());
  }
  py::list out;
  for (const auto& error : errors) {
    if (error.empty()) out.append(py::none());
    else out.append(py::str(error));
  }
  return out;
}

// Checks `levels` and allocates its frequencies into `out`.
kvc::LevelRows level_rows(const py::array& levels, py::array_t<uint16_t>* out) {
  check_array(levels, "levels", 'u', 1, 2);
  if (levels.shape(1) < 1 || levels.shape(1) > kvc::MAX_ALPHABET)
    throw py::value_error("levels: alphabet must be in [1, 256]");
  *out = py::array_t<uint16_t>({levels.shape(0), levels.shape(1)});
  return {static_cast<const uint8_t*>(levels.data()), out->mutable_data(),
          (size_t)levels.shape(0), (int)levels.shape(1)};
}

// The bytes of a 1-D byte buffer in order. A strided view (memoryview(b)[::2], a reversed
// array) has its elements `stride` bytes apart, the first at `ptr` even when the stride is
// negative: reading `size` bytes on from `ptr` would read other bytes, and past the end of
// a reversed one. Contiguous buffers are read in place, others gathered into `copy`.
const uint8_t* buffer_bytes(const py::buffer_info& info, std::vector<uint8_t>* copy) {
  const uint8_t* p = static_cast<const uint8_t*>(info.ptr);
  const py::ssize_t stride = info.strides[0];
  if (stride == 1 || info.size <= 1) return p;
  copy->resize((size_t)info.size);
  for (py::ssize_t i = 0; i < info.size; ++i) (*copy)[(size_t)i] = p[i * stride];
  return copy->data();
}

// tables.pack_levels's packing -> levels uint8 [rows, alphabet]; ValueError where the
// data is not a valid packing (the messages tables.unpack_levels documents).
py::array unpack_levels(py::buffer data, int rows, int alphabet) {
  py::buffer_info info = data.request();
  if (info.itemsize != 1 || info.ndim != 1) throw py::value_error("data: expected bytes");
  if (rows < 0 || alphabet < 1 || alphabet > kvc::MAX_ALPHABET)
    throw py::value_error("rows must be >= 0 and alphabet in [1, 256]");
  std::vector<uint8_t> gathered;
  const uint8_t* p = buffer_bytes(info, &gathered);
  const size_t n = (size_t)info.size;
  if (n < 2 * (size_t)rows) throw py::value_error("table spans are truncated");
  size_t codes = 0;
  for (int r = 0; r < rows; ++r) {
    const int lo = p[2 * r], hi = p[2 * r + 1];
    if (lo > hi || hi >= alphabet) throw py::value_error("a table span lies outside the alphabet");
    codes += (size_t)(hi - lo + 1);
  }
  if (2 * (size_t)rows + codes != n) throw py::value_error("table codes do not match their spans");
  py::array_t<uint8_t> out({(py::ssize_t)rows, (py::ssize_t)alphabet});
  uint8_t* o = out.mutable_data();
  std::fill(o, o + (size_t)rows * alphabet, 0);
  const uint8_t* c = p + 2 * (size_t)rows;
  for (int r = 0; r < rows; ++r) {
    const int lo = p[2 * r], hi = p[2 * r + 1];
    uint8_t* row = o + (size_t)r * alphabet;
    for (int s = lo; s <= hi; ++s, ++c) {
      if (*c > kvc::MAX_LEVEL) throw py::value_error("a table level is out of range");
      row[s] = *c ? (uint8_t)(64 - *c) : 0;
    }
    if (!row[lo] || !row[hi])
      throw py::value_error("a table span does not start and end on present symbols");
  }
  return out;
}

py::array normalize_freqs(py::array levels) {
  py::array_t<uint16_t> out;
  const kvc::LevelRows rows = level_rows(levels, &out);
  std::string err;
  kvc::normalize_many(&rows, 1, 1, &err);
  if (!err.empty()) throw py::value_error("levels: " + err);
  return out;
}

// normalize_freqs over a list of level arrays, in parallel with the GIL released (a file
// holds one per stream: 60 for the default model).
std::vector<py::array_t<uint16_t>> normalize_many(py::list levels, int threads) {
  std::vector<py::array> in;  // keeps the inputs alive while the GIL is released
  std::vector<py::array_t<uint16_t>> out(levels.size());
  std::vector<kvc::LevelRows> work;
  for (size_t i = 0; i < levels.size(); ++i) {
    in.push_back(levels[i].cast<py::array>());
    work.push_back(level_rows(in.back(), &out[i]));
  }
  std::vector<std::string> errors(work.size());
  {
    py::gil_scoped_release release;
    kvc::normalize_many(work.data(), work.size(), threads, errors.data());
  }
  for (size_t i = 0; i < errors.size(); ++i)
    if (!errors[i].empty())
      throw py::value_error("levels[" + std::to_string(i) + "]: " + errors[i]);
  return out;
}

// The sums SharedTables.fits weighs (kvcodec/format/shared.py) over a file's own
// frequencies and shared ones of the same layout, per stream weighted by its tokens:
// (every symbol the file codes present in the shared tables, its coded bits with its own
// tables (entropy), the bits more with the shared ones (cross-entropy less entropy), how
// many symbols it uses). One pass over the mostly zero [rows, alphabet] tables: in NumPy
// the same took 8 ms a file (60 streams of 193 x 256), most of a store entry's encode.
py::tuple table_fit(py::list own, py::list shared, const std::vector<double>& tokens) {
  if (own.size() != shared.size() || own.size() != tokens.size())
    throw py::value_error("table_fit: own, shared and tokens differ in length");
  using U16 = py::array_t<uint16_t, py::array::c_style | py::array::forcecast>;
  std::vector<U16> a, b;
  for (size_t i = 0; i < own.size(); ++i) {
    a.push_back(own[i].cast<U16>());
    b.push_back(shared[i].cast<U16>());
    if (a.back().size() != b.back().size())
      throw py::value_error("table_fit: stream " + std::to_string(i) + " differs in shape");
  }
  double payload = 0, extra = 0;
  long long used = 0;
  bool present = true;
  static const std::vector<double> lg = [] {  // log2(f / PROB_SCALE), f <= PROB_SCALE
    std::vector<double> t(kvc::PROB_SCALE + 1, 0.0);
    for (uint32_t f = 1; f <= kvc::PROB_SCALE; ++f) t[f] = std::log2((double)f / kvc::PROB_SCALE);
    return t;
  }();
  {
    py::gil_scoped_release release;
    const double inv = 1.0 / kvc::PROB_SCALE;
    auto log2p = [&](uint16_t f) { return f <= kvc::PROB_SCALE ? lg[f] : std::log2(f * inv); };
    for (size_t s = 0; s < a.size() && present; ++s) {
      const uint16_t* f = a[s].data();
      const uint16_t* g = b[s].data();
      double ent = 0, cross = 0;
      for (py::ssize_t i = 0, n = a[s].size(); i < n; ++i) {
        uint64_t four;  // mostly zeros: skip four at a time
        if (i + 4 <= n && (memcpy(&four, f + i, 8), four == 0)) {
          i += 3;
          continue;
        }
        if (!f[i]) continue;
        if (!g[i]) {
          present = false;
          break;
        }
        const double p = f[i] * inv, lp = log2p(f[i]);
        ent += p * lp;
        cross += p * (lp - log2p(g[i]));
        ++used;
      }
      payload -= tokens[s] * ent;
      extra += tokens[s] * cross;
    }
  }
  return py::make_tuple(present, extra, payload, used);
}

// A C-contiguous array of the given kind ('f' float, 'i' signed int), itemsize and shape
// rank; the caller keeps it alive while the GIL is released.
py::array checked(const py::object& o, const char* name, char kind, int itemsize, int ndim) {
  if (!py::isinstance<py::array>(o)) {
    throw py::value_error(std::string(name) + ": expected a NumPy array");
  }
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (a.dtype().kind() != kind || a.itemsize() != itemsize || a.ndim() != ndim ||
      !(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": expected a C-contiguous " +
                          std::to_string(ndim) + "-D array of " + std::string(1, kind) +
                          std::to_string(8 * itemsize) + ", got " +
                          std::string(py::str(a.dtype())) + " of " +
                          std::to_string(a.ndim()) + " dimensions");
  }
  return a;
}

// [(symbols uint8 [T, C], alphabet, groups int64 [C] or None)] -> [(freqs uint16 [C, A],
// spans bytes, codes bytes)], the streams in parallel with the GIL released.
py::list stream_tables(py::list items, int threads) {
  const size_t n = items.size();
  std::vector<py::array> keep;
  std::vector<kvc::TablesJob> jobs(n);
  std::vector<py::array_t<uint16_t>> freqs(n);
  std::vector<std::vector<uint8_t>> spans(n);
  for (size_t i = 0; i < n; ++i) {
    py::tuple item = items[i].cast<py::tuple>();
    if (item.size() != 3) throw py::value_error("items: each item is (symbols, alphabet, groups)");
    keep.push_back(checked(item[0], "symbols", 'u', 1, 2));
    const py::array& sym = keep.back();
    kvc::TablesJob& job = jobs[i];
    job.symbols = static_cast<const uint8_t*>(sym.data());
    if (sym.shape(1) < 1 || sym.shape(1) > 65535) {
      throw py::value_error("symbols: channels must be in [1, 65535]");
    }
    job.rows = int_dim(sym.shape(0), "symbols: rows");
    job.channels = (int)sym.shape(1);
    job.alphabet = item[1].cast<int>();
    if (job.alphabet < 1 || job.alphabet > kvc::MAX_ALPHABET) {
      throw py::value_error("alphabet must be in [1, 256]");
    }
    job.groups = nullptr;
    if (!item[2].is_none()) {
      keep.push_back(checked(item[2], "groups", 'i', 8, 1));
      if (keep.back().shape(0) != job.channels) {
        throw py::value_error("groups: expected one entry per channel");
      }
      job.groups = static_cast<const int64_t*>(keep.back().data());
    }
    freqs[i] = py::array_t<uint16_t>({(py::ssize_t)job.channels, (py::ssize_t)job.alphabet});
    job.freqs = freqs[i].mutable_data();
    spans[i].resize(2 * (size_t)job.channels);
    job.spans = spans[i].data();
  }
  {
    py::gil_scoped_release release;
    kvc::stream_tables_many(jobs.data(), n, threads);
  }
  py::list out;
  for (size_t i = 0; i < n; ++i) {
    if (!jobs[i].error.empty()) {
      throw py::value_error("items[" + std::to_string(i) + "]: " + jobs[i].error);
    }
    const auto& c = jobs[i].codes;
    out.append(py::make_tuple(
        freqs[i], py::bytes(reinterpret_cast<const char*>(spans[i].data()), spans[i].size()),
        py::bytes(reinterpret_cast<const char*>(c.data()), c.size())));
  }
  return out;
}

// Stream inputs of layers into out float32 [N, T, H * D]: xs[i] (float32 [H, T, D], rows
// and channels contiguous, any head stride: a token slice of a cache) goes to out[layers[i]],
// un-rotated with cos/sin float32 [T, rotary_dim] (or None) and `divisor`; returns whether
// every value written is finite. Layers in parallel, GIL released.
bool stream_inputs(py::list xs, const py::object& out_obj, const std::vector<int>& layers,
                   const py::object& cos_obj, const py::object& sin_obj, float divisor,
                   int threads) {
  py::array out = checked(out_obj, "out", 'f', 4, 3);
  if (!out.writeable()) throw py::value_error("out: must be writable");
  const py::ssize_t n = out.shape(0), t = int_dim(out.shape(1), "out: tokens");
  int_dim(out.shape(2), "out: channels");  // the coder's heads * head_dim is an int
  if (xs.size() != layers.size()) throw py::value_error("xs: expected one array per layer");
  std::vector<py::array> keep;
  for (size_t i = 0; i < xs.size(); ++i) {
    const py::object o = xs[i];
    if (!py::isinstance<py::array>(o)) throw py::value_error("xs: expected NumPy arrays");
    py::array a = py::reinterpret_borrow<py::array>(o);
    // Each int before the product (a broadcast array can claim any number of heads).
    const auto width = [&] {
      return (int64_t)int_dim(a.shape(0), "xs: heads") * int_dim(a.shape(2), "xs: head_dim");
    };
    if (a.dtype().kind() != 'f' || a.itemsize() != 4 || a.ndim() != 3 || a.shape(1) != t ||
        width() != out.shape(2) || a.strides(2) != 4 ||
        a.strides(1) != 4 * a.shape(2) || a.strides(0) < 0 || a.strides(0) % 4) {
      throw py::value_error("xs: expected float32 [heads, tokens, head_dim] arrays with "
                            "contiguous tokens and channels, matching out");
    }
    if (i && (a.shape(0) != keep[0].shape(0) || a.shape(2) != keep[0].shape(2))) {
      throw py::value_error("xs: every layer needs the same heads and head_dim");
    }
    keep.push_back(a);
  }
  py::array cos, sin;
  int rotary_dim = 0;
  const py::ssize_t d = keep.empty() ? 0 : keep[0].shape(2);
  if (!cos_obj.is_none()) {
    cos = checked(cos_obj, "cos", 'f', 4, 2);
    sin = checked(sin_obj, "sin", 'f', 4, 2);
    rotary_dim = int_dim(cos.shape(1), "cos: rotary_dim");
    if (cos.shape(0) != t || sin.shape(0) != t || sin.shape(1) != rotary_dim ||
        rotary_dim % 2 || rotary_dim > d || rotary_dim < 2) {
      throw py::value_error("cos/sin: expected [tokens, rotary_dim], rotary_dim even and "
                            "at most head_dim");
    }
  }
  std::vector<kvc::InputJob> jobs;
  std::vector<bool> written((size_t)n, false);  // two jobs on one layer would race
  for (size_t i = 0; i < layers.size(); ++i) {
    const int l = layers[i];
    if (l < 0 || l >= n) throw py::value_error("layers: index out of range");
    if (written[(size_t)l]) throw py::value_error("layers: layer " + std::to_string(l) + " twice");
    written[(size_t)l] = true;
    const py::array& a = keep[i];
    kvc::InputJob j;
    j.x = static_cast<const float*>(a.data());
    j.head_stride = (size_t)(a.strides(0) / 4);
    j.heads = (int)a.shape(0);
    j.rows = (int)t;
    j.head_dim = (int)d;
    j.cos = rotary_dim ? static_cast<const float*>(cos.data()) : nullptr;
    j.sin = rotary_dim ? static_cast<const float*>(sin.data()) : nullptr;
    j.rotary_dim = rotary_dim;
    j.divisor = divisor;
    j.out = static_cast<float*>(out.mutable_data()) + (size_t)l * t * out.shape(2);
    j.finite = false;
    jobs.push_back(j);
  }
  {
    py::gil_scoped_release release;
    kvc::stream_inputs_many(jobs.data(), jobs.size(), threads);
  }
  for (const auto& j : jobs)
    if (!j.finite) return false;
  return true;
}

// x float32 [N, T, C] and per-layer parameters -> uint8 symbols, layers in parallel with
// the GIL released. `token`: code uint8 [N, T], grid [256], mult [N, C], params = R per
// layer; else (absmax): inv float32 [N, T], params = M per layer.
py::array quantize_layers(const py::object& x_obj, bool token, const py::object& per_row,
                          const py::object& grid_obj, const py::object& mult_obj,
                          const std::vector<int>& params, int threads) {
  py::array x = checked(x_obj, "x", 'f', 4, 3);
  const py::ssize_t n = x.shape(0), rows = int_dim(x.shape(1), "x: tokens");
  const py::ssize_t channels = x.shape(2);
  if ((py::ssize_t)params.size() != n) {
    throw py::value_error("params: expected one entry per layer");
  }
  if (channels < 1 || channels > 65534) throw py::value_error("x: channels must be in [1, 65534]");
  py::array row = token ? checked(per_row, "code", 'u', 1, 2) : checked(per_row, "inv", 'f', 4, 2);
  if (row.shape(0) != n || row.shape(1) != rows) {
    throw py::value_error("per-token parameters: expected [layers, tokens]");
  }
  py::array grid, mult;
  if (token) {
    grid = checked(grid_obj, "grid", 'f', 4, 1);
    mult = checked(mult_obj, "mult", 'f', 4, 2);
    if (grid.shape(0) != 256) throw py::value_error("grid: expected 256 steps");
    if (mult.shape(0) != n || mult.shape(1) != channels) {
      throw py::value_error("mult: expected [layers, channels]");
    }
  }
  for (int p : params) {
    if (p < 0 || p > 127) throw py::value_error("params: R or M must be in [0, 127]");
  }
  const py::ssize_t width = channels + (token ? 1 : 0);
  py::array_t<uint8_t> out({n, rows, width});
  std::vector<kvc::QuantizeJob> jobs(n);
  for (py::ssize_t l = 0; l < n; ++l) {
    kvc::QuantizeJob& j = jobs[l];
    j.x = static_cast<const float*>(x.data()) + (size_t)l * rows * channels;
    j.code = token ? static_cast<const uint8_t*>(row.data()) + (size_t)l * rows : nullptr;
    j.inv = token ? nullptr : static_cast<const float*>(row.data()) + (size_t)l * rows;
    j.grid = token ? static_cast<const float*>(grid.data()) : nullptr;
    j.mult = token ? static_cast<const float*>(mult.data()) + (size_t)l * channels : nullptr;
    j.rows = (int)rows;
    j.channels = (int)channels;
    j.param = params[l];
    j.out = out.mutable_data() + (size_t)l * rows * width;
  }
  {
    py::gil_scoped_release release;
    kvc::quantize_many(jobs.data(), jobs.size(), threads);
  }
  return out;
}

// kvc::max_encoded_size, refusing sizes whose bound does not fit 64 bits (it would wrap
// to a small number, and a buffer of that size would be too small).
uint64_t max_encoded_size(uint64_t tokens, uint64_t channels) {
  uint64_t elements, words;
  if (__builtin_mul_overflow(tokens, channels, &elements) ||
      __builtin_mul_overflow(elements, (uint64_t)2, &words) ||
      words > UINT64_MAX - (uint64_t)(kvc::STATE_BYTES + 2 * kvc::LANES)) {
    throw py::value_error("max_encoded_size: " + std::to_string(tokens) + " tokens x " +
                          std::to_string(channels) + " channels overflows 64 bits");
  }
  return kvc::max_encoded_size(tokens, channels);
}

// A contiguous buffer as the buffer protocol's simple request gives it (what zlib.crc32
// takes: a strided view is a BufferError), released when done.
class SimpleBuffer {
 public:
  explicit SimpleBuffer(const py::object& o) {
    if (PyObject_GetBuffer(o.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  SimpleBuffer(const SimpleBuffer&) = delete;
  SimpleBuffer& operator=(const SimpleBuffer&) = delete;
  ~SimpleBuffer() { PyBuffer_Release(&view_); }
  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  size_t size() const { return (size_t)view_.len; }

 private:
  Py_buffer view_;
};

uint32_t crc32_of(const py::object& data, uint32_t crc) {
  SimpleBuffer b(data);
  if (b.size() < (1u << 16)) return kvc::crc32(crc, b.data(), b.size());
  py::gil_scoped_release release;  // a payload: other threads (fetches) go on meanwhile
  return kvc::crc32(crc, b.data(), b.size());
}

using U64s = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
using U32s = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>;

// The first i whose bytes data[starts[i]:starts[i] + sizes[i]] are not all in `data` or
// do not have the checksum crcs[i]; -1 where every item checks.
py::ssize_t crc32_items(const py::object& data, const U64s& starts, const U64s& sizes,
                        const U32s& crcs) {
  const py::ssize_t n = starts.size();
  if (starts.ndim() != 1 || sizes.ndim() != 1 || crcs.ndim() != 1 || sizes.size() != n ||
      crcs.size() != n) {
    throw py::value_error("crc32_items: starts, sizes and crcs must be 1-D, of one length");
  }
  SimpleBuffer b(data);
  const uint64_t *s = starts.data(), *z = sizes.data();
  const uint32_t* c = crcs.data();
  py::gil_scoped_release release;
  for (py::ssize_t i = 0; i < n; ++i) {
    if (s[i] > b.size() || z[i] > b.size() - s[i] || kvc::crc32(0, b.data() + s[i], z[i]) != c[i])
      return i;
  }
  return -1;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kvcodec native interleaved rANS coder (CPU)";
  m.attr("BITSTREAM_VERSION") = kvc::BITSTREAM_VERSION;
  m.attr("PROB_BITS") = kvc::PROB_BITS;
  m.def("simd_path", [] { return std::string(kvc::simd_path()); },
        "The rANS decode path in use: 'avx512', 'avx2' or 'scalar'.");
  m.def("set_simd_path", [](const std::string& name) { return kvc::set_simd_path(name); },
        py::arg("name"),
        "Choose the decode path: 'scalar', 'avx2', 'avx512' (False if the CPU lacks it) "
        "or 'auto'.");
  m.def("simd_gather", [] { return std::string(kvc::simd_gather()); },
        "How the SIMD decode path in use reads its tables: 'hardware' gathers or scalar "
        "'loads' (measured on its first decode, unless KVCODEC_GATHER sets it).");
  m.def("set_simd_gather", [](const std::string& name) { return kvc::set_simd_gather(name); },
        py::arg("name"),
        "Choose how the SIMD paths read their tables: 'hardware', 'loads' or 'auto' (the "
        "environment's choice, else the faster as measured); the same bits either way.");
  m.def("gather_probe", [] {
          const kvc::GatherProbe p = kvc::gather_probe();
          return py::make_tuple(p.hardware_s, p.loads_s);
        },
        "(hardware_s, loads_s): the decode path in use's measurement of both ways "
        "(zeros on the scalar path).");
  m.attr("LANES") = kvc::LANES;
  m.attr("MAX_LEVEL") = kvc::MAX_LEVEL;
  m.def("normalize_freqs", &normalize_freqs, py::arg("levels"),
        "uint8 levels [N, A] -> uint16 frequencies [N, A] summing to 2**PROB_BITS per row.");
  m.def(
      "encode",
      [](py::array symbols, py::array freqs, int chunk_tokens) {
        const kvc::EncodeJob job = check_encode(symbols, freqs, chunk_tokens);
        kvc::EncodeResult result;
        {
          py::gil_scoped_release release;
          kvc::encode_many(&job, 1, chunk_tokens, 1, &result);
        }
        return blobs_to_python(result);
      },
      py::arg("symbols"), py::arg("freqs"), py::arg("chunk_tokens"),
      "Encode uint8 symbols [T, C] with per-channel tables freqs [C, A] into one blob per "
      "chunk of chunk_tokens rows.");
  m.def("encode_many", &encode_many, py::arg("items"), py::arg("chunk_tokens"),
        py::arg("threads") = 0, "encode() over a list of (symbols, freqs), in parallel.");
  py::class_<Tables, std::shared_ptr<Tables>>(m, "DecodeTables",
                                               "Prebuilt decode tables of one stream.")
      .def_property_readonly("channels", [](const Tables& t) { return t.channels; })
      .def_property_readonly("alphabet", [](const Tables& t) { return t.alphabet; });
  m.def("unpack_levels", &unpack_levels, py::arg("data"), py::arg("rows"), py::arg("alphabet"),
        "tables.pack_levels's packing -> uint8 levels [rows, alphabet] (ValueError if invalid).");
  m.def("normalize_many", &normalize_many, py::arg("levels"), py::arg("threads") = 0,
        "normalize_freqs over a list of uint8 level arrays, in parallel.");
  m.def("table_fit", &table_fit, py::arg("own"), py::arg("shared"), py::arg("tokens"),
        "SharedTables.fits' sums: (present, extra bits, own payload bits, used symbols).");
  m.def("build_decode_tables", &build_decode_tables, py::arg("freqs"), py::arg("threads") = 0,
        "[uint16 freqs [C, A]] -> [DecodeTables], built in parallel; pass them to "
        "decode_many in place of freqs.");
  m.def("decode_many", &decode_many, py::arg("items"), py::arg("chunk_tokens"),
        py::arg("threads") = 0,
        "Decode [(blobs, freqs or DecodeTables, out[, dequant])] in parallel; returns None or an error message "
        "per item. With dequant = (grid, mult, half_range, heads, out_f32, cos, sin[, add]), also "
        "writes the per-token-step uniform reconstruction [heads, rows, head_dim] (+ add per "
        "channel), RoPE "
        "re-applied when cos/sin are given (out_f32 may also be (flat, head_stride, "
        "chan, row_at): each row placed at row_at[row] of a 1-D flat array, or not "
        "stored where negative, chan a channel stride or an int64 array of each channel's "
        "place from its row's head start); out may then be (rows, channels) instead of "
        "an array, and the symbols are not kept (each chunk is dequantized from a scratch "
        "buffer as soon as it is decoded).");
  m.def("stream_tables", &stream_tables, py::arg("items"), py::arg("threads") = 0,
        "Writer tables of many streams, in parallel: [(symbols uint8 [T, C], alphabet, "
        "groups int64 [C] or None)] -> [(freqs uint16 [C, alphabet], spans bytes [C, 2], "
        "codes bytes)]: the histograms (pooled over equal groups), their levels "
        "(tables.levels_from_counts), normalize_freqs of them, and their packing "
        "(tables.pack_levels, split into spans and codes).");
  m.def("stream_inputs", &stream_inputs, py::arg("xs"), py::arg("out"), py::arg("layers"),
        py::arg("cos"), py::arg("sin"), py::arg("divisor"), py::arg("threads") = 0,
        "Stream inputs (streams.stream_input) of layers xs[i] float32 [H, T, D] into "
        "out[layers[i]] of out float32 [N, T, H * D], keys un-rotated with cos/sin "
        "[T, rotary_dim] (or None) and divisor as transforms.rope(inverse=True) does; "
        "returns whether all are finite.");
  m.def(
      "quantize_token",
      [](const py::object& x, const py::object& code, const py::object& grid,
         const py::object& mult, const std::vector<int>& half_range, int threads) {
        return quantize_layers(x, true, code, grid, mult, half_range, threads);
      },
      py::arg("x"), py::arg("code"), py::arg("grid"), py::arg("mult"), py::arg("half_range"),
      py::arg("threads") = 0,
      "Per-token-step uniform quantizer over layers: x float32 [N, T, C], step codes uint8 "
      "[N, T], grid float32 [256], mult float32 [N, C], R per layer -> uint8 [N, T, C + 1].");
  m.def(
      "quantize_absmax",
      [](const py::object& x, const py::object& inv, const std::vector<int>& m,
         int threads) {
        return quantize_layers(x, false, inv, py::none(), py::none(), m, threads);
      },
      py::arg("x"), py::arg("inv"), py::arg("m"), py::arg("threads") = 0,
      "Absmax quantizer over layers: x float32 [N, T, C], inv float32 [N, T] (M / scale "
      "as PyTorch rounds it), M per layer -> uint8 round(x * inv + M) clamped to [0, 2M].");
  m.def("max_encoded_size", &max_encoded_size, py::arg("tokens"), py::arg("channels"));
  m.def("crc32", &crc32_of, py::arg("data"), py::arg("crc") = 0,
        "zlib.crc32(data, crc): the same checksum, 16 bytes per step where the CPU has "
        "carry-less multiplication (a contiguous buffer).");
  m.def("crc32_items", &crc32_items, py::arg("data"), py::arg("starts"), py::arg("sizes"),
        py::arg("crcs"),
        "The index of the first item data[start:start + size] that is not whole in data "
        "or whose crc32 is not crcs[i]; -1 where all check.");
  m.def(
      "dequant_symbols",
      [](const py::object& sym_obj, const py::tuple& d) {
        py::array sym = checked(sym_obj, "symbols", 'u', 1, 2);
        const int rows = (int)sym.shape(0), channels = (int)sym.shape(1);
        kvc::DequantSpec spec = check_dequant(d, rows, channels);
        std::string err;
        {
          py::gil_scoped_release release;
          err = kvc::dequant_token(static_cast<const uint8_t*>(sym.data()), rows, spec);
        }
        return err;
      },
      py::arg("symbols"), py::arg("dequant"),
      "Dequantize per-token-step symbols uint8 [rows, C + 1] (C-contiguous) with a dequant "
      "tuple as decode_many takes it; returns '' or the error message.");
}
