// The one Python binding of the native coder. Arrays come in as NumPy buffers and are
// checked here, at the boundary, with messages that name the argument; the coder itself
// never sees Python objects and runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/rans.h"
#include "decoder/decoder.h"
#include "decoder/dequant.h"
#include "encoder/encoder.h"

namespace py = pybind11;

namespace {

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

struct Table {
  const uint16_t* freqs;
  int channels, alphabet;
};

Table check_freqs(const py::array& freqs, const char* name, int channels) {
  check_array(freqs, name, 'u', 2, 2);
  const int c = (int)freqs.shape(0), a = (int)freqs.shape(1);
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

int resolve_threads(int threads, size_t jobs) {
  if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
  return (int)std::max<size_t>(1, std::min<size_t>((size_t)threads, jobs));
}

// Runs fn(i) for i in [0, n) on `threads` workers pulling from a shared counter.
template <class F>
void parallel_for(size_t n, int threads, F fn) {
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < n;) fn(i);
  };
  if (threads <= 1) {
    work();
    return;
  }
  std::vector<std::thread> pool;
  for (int k = 0; k < threads; ++k) pool.emplace_back(work);
  for (auto& th : pool) th.join();
}

struct EncodeJob {
  const uint8_t* symbols;
  int rows, channels;
  Table table;
  std::vector<uint32_t> cums;
  std::vector<std::vector<uint8_t>> blobs;
  std::string error;
};

EncodeJob make_encode_job(const py::array& symbols, const py::array& freqs, int chunk_tokens) {
  check_array(symbols, "symbols", 'u', 1, 2);
  if (symbols.shape(1) < 1 || symbols.shape(1) > 65535) {
    throw py::value_error("symbols: channels must be in [1, 65535]");
  }
  if (chunk_tokens < 1) throw py::value_error("chunk_tokens must be >= 1");
  EncodeJob job;
  job.symbols = static_cast<const uint8_t*>(symbols.data());
  job.rows = (int)symbols.shape(0);
  job.channels = (int)symbols.shape(1);
  job.table = check_freqs(freqs, "freqs", job.channels);
  return job;
}

void run_encode(EncodeJob& job, int chunk_tokens) {
  job.cums.resize((size_t)job.channels * job.table.alphabet);
  kvc::cumulative(job.table.freqs, job.channels, job.table.alphabet, job.cums.data());
  const int n_chunks = (job.rows + chunk_tokens - 1) / chunk_tokens;
  job.blobs.resize(n_chunks);
  for (int i = 0; i < n_chunks && job.error.empty(); ++i) {
    const int t0 = i * chunk_tokens, rows = std::min(chunk_tokens, job.rows - t0);
    job.error = kvc::encode_blob(job.symbols + (size_t)t0 * job.channels, rows, job.channels,
                                 job.table.freqs, job.cums.data(), job.table.alphabet,
                                 &job.blobs[i]);
    if (!job.error.empty()) job.error = "chunk " + std::to_string(i) + ": " + job.error;
  }
}

py::list blobs_to_python(const EncodeJob& job) {
  if (!job.error.empty()) throw py::value_error("symbols: " + job.error);
  py::list out;
  for (const auto& b : job.blobs) {
    out.append(py::bytes(reinterpret_cast<const char*>(b.data()), b.size()));
  }
  return out;
}

py::list encode_many(py::list items, int chunk_tokens, int threads) {
  std::vector<EncodeJob> jobs;
  jobs.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    py::tuple item = items[i].cast<py::tuple>();
    if (item.size() != 2) throw py::value_error("items: each item is (symbols, freqs)");
    jobs.push_back(make_encode_job(item[0].cast<py::array>(), item[1].cast<py::array>(),
                                   chunk_tokens));
  }
  {
    py::gil_scoped_release release;
    parallel_for(jobs.size(), resolve_threads(threads, jobs.size()),
                 [&](size_t i) { run_encode(jobs[i], chunk_tokens); });
  }
  py::list out;
  for (auto& job : jobs) out.append(blobs_to_python(job));
  return out;
}

// Decode tables built once per stream of a file and reused by every decode call on it
// (a chunk-by-chunk decode would otherwise rebuild ~1 MB of tables per stream per chunk).
struct Tables {
  kvc::DecodeTables t;
  int channels = 0, alphabet = 0;
};

std::vector<std::shared_ptr<Tables>> build_decode_tables(py::list freqs, int threads) {
  std::vector<Table> specs;
  for (size_t i = 0; i < freqs.size(); ++i) {
    const py::array a = freqs[i].cast<py::array>();
    const int channels = a.ndim() == 2 ? (int)a.shape(0) : 0;
    specs.push_back(check_freqs(a, "freqs", channels));
  }
  std::vector<std::shared_ptr<Tables>> out(specs.size());
  {
    py::gil_scoped_release release;
    parallel_for(specs.size(), resolve_threads(threads, specs.size()), [&](size_t i) {
      auto t = std::make_shared<Tables>();
      t->channels = specs[i].channels;
      t->alphabet = specs[i].alphabet;
      kvc::build_tables(specs[i].freqs, t->channels, t->alphabet, &t->t);
      out[i] = std::move(t);
    });
  }
  return out;
}

struct DecodeJob {
  std::vector<std::pair<const uint8_t*, size_t>> blobs;
  std::vector<py::buffer_info> keep;  // holds the buffers while the GIL is released
  Table table;
  std::shared_ptr<Tables> built;  // prebuilt tables, or null: build from `table`
  uint8_t* out;
  int rows, channels;
  std::optional<kvc::DequantSpec> dequant;
  std::string error;
};

void run_decode(DecodeJob& job, int chunk_tokens) {
  kvc::DecodeTables local;
  if (!job.built) kvc::build_tables(job.table.freqs, job.channels, job.table.alphabet, &local);
  const kvc::DecodeTables& tables = job.built ? job.built->t : local;
  for (size_t i = 0; i < job.blobs.size(); ++i) {
    const int t0 = (int)i * chunk_tokens, rows = std::min(chunk_tokens, job.rows - t0);
    std::string err = kvc::decode_blob(job.blobs[i].first, job.blobs[i].second, rows,
                                       job.channels, tables,
                                       job.out + (size_t)t0 * job.channels);
    if (!err.empty()) {
      job.error = "blob " + std::to_string(i) + ": " + err;
      return;
    }
  }
  if (job.dequant) job.error = kvc::dequant_token(job.out, job.rows, *job.dequant);
}

// The array must already be a NumPy array (never a converted temporary): the caller's
// items keep it alive while the GIL is released.
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

// A writable float32 [heads, rows, head_dim] array whose rows and channels are contiguous;
// the head stride may be larger (a token slice of a preallocated cache buffer).
float* strided_out(const py::object& o, int heads, int rows, int head_dim, size_t* head_stride) {
  if (!py::isinstance<py::array>(o)) {
    throw py::value_error("dequant out: expected a NumPy float32 array");
  }
  py::array a = py::reinterpret_borrow<py::array>(o);
  const py::ssize_t f = 4;
  if (a.dtype().kind() != 'f' || a.itemsize() != 4 || a.ndim() != 3 || a.shape(0) != heads ||
      a.shape(1) != rows || a.shape(2) != head_dim) {
    throw py::value_error("dequant out: expected float32 [" + std::to_string(heads) + ", " +
                          std::to_string(rows) + ", " + std::to_string(head_dim) + "]");
  }
  if (a.strides(2) != f || a.strides(1) != f * head_dim || a.strides(0) % f ||
      (heads > 1 && a.strides(0) < f * head_dim * rows)) {
    throw py::value_error("dequant out: tokens and channels must be contiguous and heads "
                          "must not overlap");
  }
  if (!a.writeable()) throw py::value_error("dequant out: must be writable");
  *head_stride = (size_t)(a.strides(0) / f);
  return static_cast<float*>(a.mutable_data());
}

// (grid [256], mult [C], R, heads, out [heads, rows, head_dim], cos, sin) -> spec.
kvc::DequantSpec check_dequant(const py::tuple& d, int rows, int channels) {
  if (d.size() != 7) {
    throw py::value_error("dequant: expected (grid, mult, half_range, heads, out, cos, sin)");
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
  spec.out = strided_out(d[4], spec.heads, rows, spec.head_dim, &spec.head_stride);
  if (!d[5].is_none()) {
    if (spec.head_dim % 2) throw py::value_error("dequant: RoPE needs an even head_dim");
    spec.cos = float_data(d[5], "dequant cos", (size_t)rows * spec.head_dim);
    spec.sin = float_data(d[6], "dequant sin", (size_t)rows * spec.head_dim);
  }
  return spec;
}

py::list decode_many(py::list items, int chunk_tokens, int threads) {
  if (chunk_tokens < 1) throw py::value_error("chunk_tokens must be >= 1");
  std::vector<DecodeJob> jobs(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    py::tuple item = items[i].cast<py::tuple>();
    if (item.size() != 3 && item.size() != 4) {
      throw py::value_error("items: each item is (blobs, freqs, out[, dequant])");
    }
    DecodeJob& job = jobs[i];
    py::array out = item[2].cast<py::array>();
    check_array(out, "out", 'u', 1, 2);
    if (!out.writeable()) throw py::value_error("out: must be writable");
    job.rows = (int)out.shape(0);
    job.channels = (int)out.shape(1);
    if (job.channels < 1 || job.channels > 65535) {
      throw py::value_error("out: channels must be in [1, 65535]");
    }
    job.out = static_cast<uint8_t*>(out.mutable_data());
    if (py::isinstance<Tables>(item[1])) {
      job.built = item[1].cast<std::shared_ptr<Tables>>();
      if (job.built->channels != job.channels) {
        throw py::value_error("tables: built for " + std::to_string(job.built->channels) +
                              " channels but the symbols have " +
                              std::to_string(job.channels));
      }
    } else {
      job.table = check_freqs(item[1].cast<py::array>(), "freqs", job.channels);
    }
    if (item.size() == 4 && !item[3].is_none()) {
      job.dequant = check_dequant(item[3].cast<py::tuple>(), job.rows, job.channels);
    }
    py::list blobs = item[0].cast<py::list>();
    const size_t expected = ((size_t)job.rows + chunk_tokens - 1) / chunk_tokens;
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
      job.blobs.emplace_back(static_cast<const uint8_t*>(info.ptr), (size_t)info.size);
      job.keep.push_back(std::move(info));
    }
  }
  {
    py::gil_scoped_release release;
    parallel_for(jobs.size(), resolve_threads(threads, jobs.size()),
                 [&](size_t i) { run_decode(jobs[i], chunk_tokens); });
  }
  py::list errors;
  for (auto& job : jobs) {
    if (job.error.empty()) errors.append(py::none());
    else errors.append(py::str(job.error));
  }
  return errors;
}

// normalize_freqs over the `n` rows of one levels array; "" or what is wrong. Plain
// pointers, so it runs without the GIL.
struct LevelRows {
  const uint8_t* levels;
  uint16_t* freqs;
  size_t n;
  int alphabet;
};

std::string normalize_rows(const LevelRows& t) {
  const int a = t.alphabet;
  for (size_t r = 0; r < t.n; ++r) {
    if (!kvc::normalize_freqs(t.levels + r * a, a, t.freqs + r * a))
      return "row " + std::to_string(r) + " has no present symbol or a level above 63";
  }
  return std::string();
}

// Checks `levels` and allocates its frequencies into `out`.
LevelRows level_rows(const py::array& levels, py::array_t<uint16_t>* out) {
  check_array(levels, "levels", 'u', 1, 2);
  if (levels.shape(1) < 1 || levels.shape(1) > kvc::MAX_ALPHABET)
    throw py::value_error("levels: alphabet must be in [1, 256]");
  *out = py::array_t<uint16_t>({levels.shape(0), levels.shape(1)});
  return {static_cast<const uint8_t*>(levels.data()), out->mutable_data(),
          (size_t)levels.shape(0), (int)levels.shape(1)};
}

py::array normalize_freqs(py::array levels) {
  py::array_t<uint16_t> out;
  const std::string err = normalize_rows(level_rows(levels, &out));
  if (!err.empty()) throw py::value_error("levels: " + err);
  return out;
}

// normalize_freqs over a list of level arrays, in parallel with the GIL released (a file
// holds one per stream: 60 for the default model).
std::vector<py::array_t<uint16_t>> normalize_many(py::list levels, int threads) {
  std::vector<py::array> in;  // keeps the inputs alive while the GIL is released
  std::vector<py::array_t<uint16_t>> out(levels.size());
  std::vector<LevelRows> work;
  for (size_t i = 0; i < levels.size(); ++i) {
    in.push_back(levels[i].cast<py::array>());
    work.push_back(level_rows(in.back(), &out[i]));
  }
  std::vector<std::string> errors(work.size());
  {
    py::gil_scoped_release release;
    parallel_for(work.size(), resolve_threads(threads, work.size()),
                 [&](size_t i) { errors[i] = normalize_rows(work[i]); });
  }
  for (size_t i = 0; i < errors.size(); ++i)
    if (!errors[i].empty())
      throw py::value_error("levels[" + std::to_string(i) + "]: " + errors[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kvcodec native interleaved rANS coder (CPU)";
  m.attr("BITSTREAM_VERSION") = kvc::BITSTREAM_VERSION;
  m.attr("PROB_BITS") = kvc::PROB_BITS;
  m.attr("LANES") = kvc::LANES;
  m.attr("MAX_LEVEL") = kvc::MAX_LEVEL;
  m.def("normalize_freqs", &normalize_freqs, py::arg("levels"),
        "uint8 levels [N, A] -> uint16 frequencies [N, A] summing to 2**PROB_BITS per row.");
  m.def(
      "encode",
      [](py::array symbols, py::array freqs, int chunk_tokens) {
        EncodeJob job = make_encode_job(symbols, freqs, chunk_tokens);
        {
          py::gil_scoped_release release;
          run_encode(job, chunk_tokens);
        }
        return blobs_to_python(job);
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
  m.def("normalize_many", &normalize_many, py::arg("levels"), py::arg("threads") = 0,
        "normalize_freqs over a list of uint8 level arrays, in parallel.");
  m.def("build_decode_tables", &build_decode_tables, py::arg("freqs"), py::arg("threads") = 0,
        "[uint16 freqs [C, A]] -> [DecodeTables], built in parallel; pass them to "
        "decode_many in place of freqs.");
  m.def("decode_many", &decode_many, py::arg("items"), py::arg("chunk_tokens"),
        py::arg("threads") = 0,
        "Decode [(blobs, freqs or DecodeTables, out[, dequant])] in parallel; returns None or an error message "
        "per item. With dequant = (grid, mult, half_range, heads, out_f32, cos, sin), also "
        "writes the per-token-step uniform reconstruction [heads, rows, head_dim], RoPE "
        "re-applied when cos/sin are given.");
  m.def("max_encoded_size", [](uint64_t t, uint64_t c) { return kvc::max_encoded_size(t, c); },
        py::arg("tokens"), py::arg("channels"));
}
