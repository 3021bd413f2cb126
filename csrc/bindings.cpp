// The one Python binding of the native coder. Arrays come in as NumPy buffers and are
// checked here, at the boundary, with messages that name the argument; the coder itself
// never sees Python objects and runs without the GIL. No libtorch: callers pass NumPy
// views (torch tensors via .numpy()), so one build works with any torch version.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "common/rans.h"
#include "decoder/decoder.h"
#include "encoder/encoder.h"

namespace py = pybind11;

namespace {

std::string dtype_name(char kind, int itemsize) {
  return std::string(kind == 'u' ? "uint" : "?") + std::to_string(8 * itemsize);
}

// py::array (not py::array_t) so a wrong dtype is reported instead of silently converted.
py::array check_array(py::handle h, const std::string& name, int itemsize, int ndim) {
  if (!py::isinstance<py::array>(h)) throw py::value_error(name + ": expected a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(h);
  if (a.dtype().kind() != 'u' || a.itemsize() != itemsize) {
    throw py::value_error(name + ": expected dtype " + dtype_name('u', itemsize) + ", got " +
                          std::string(py::str(a.dtype())));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(name + ": expected " + std::to_string(ndim) + " dimensions, got " +
                          std::to_string(a.ndim()));
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(name + ": must be C-contiguous");
  return a;
}

int check_channels(py::ssize_t c, const std::string& name) {
  if (c < 1 || c > KVC_MAX_CHANNELS) {
    throw py::value_error(name + ": channels must be in [1, 65535], got " + std::to_string(c));
  }
  return (int)c;
}

int check_rows(py::ssize_t t, const std::string& name) {
  if (t > INT32_MAX) throw py::value_error(name + ": more than 2**31 - 1 rows");
  return (int)t;
}

struct Table {
  const uint16_t* freqs;
  int alphabet;
};

Table check_freqs(py::handle h, const std::string& name, int channels) {
  py::array freqs = check_array(h, name, 2, 2);
  if (freqs.shape(0) != channels) {
    throw py::value_error(name + ": has " + std::to_string(freqs.shape(0)) +
                          " rows but the symbols have " + std::to_string(channels) + " channels");
  }
  const py::ssize_t a = freqs.shape(1);
  if (a < 1 || a > KVC_MAX_ALPHABET) {
    throw py::value_error(name + ": alphabet must be in [1, 256], got " + std::to_string(a));
  }
  const uint16_t* f = static_cast<const uint16_t*>(freqs.data());
  for (int c = 0; c < channels; ++c) {
    uint32_t sum = 0;
    for (py::ssize_t s = 0; s < a; ++s) sum += f[(size_t)c * a + s];
    if (sum != KVC_PROB_SCALE) {
      throw py::value_error(name + ": row " + std::to_string(c) + " sums to " +
                            std::to_string(sum) + ", not 4096");
    }
  }
  return {f, (int)a};
}

int check_chunk_tokens(int chunk_tokens) {
  if (chunk_tokens < 1) {
    throw py::value_error("chunk_tokens: must be >= 1, got " + std::to_string(chunk_tokens));
  }
  return chunk_tokens;
}

int resolve_threads(int threads, size_t jobs) {
  if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
  return (int)std::max<size_t>(1, std::min<size_t>((size_t)threads, jobs));
}

// Runs fn(worker, i) for i in [0, n) on `threads` workers pulling from a shared counter;
// `worker` indexes per-thread scratch.
template <class F>
void parallel_for(size_t n, int threads, F fn) {
  std::atomic<size_t> next{0};
  auto work = [&](int worker) {
    for (size_t i; (i = next.fetch_add(1)) < n;) fn(worker, i);
  };
  if (threads <= 1) return work(0);
  std::vector<std::thread> pool;
  for (int k = 0; k < threads; ++k) pool.emplace_back(work, k);
  for (auto& th : pool) th.join();
}

// ---- encode ----------------------------------------------------------------------------

struct EncodeJob {
  py::array keep_symbols, keep_freqs;  // alive while the GIL is released
  const uint8_t* symbols;
  int rows, channels;
  Table table;
  std::vector<std::vector<uint8_t>> blobs;
  std::string error;
};

EncodeJob make_encode_job(py::handle symbols, py::handle freqs, const std::string& where) {
  EncodeJob job;
  job.keep_symbols = check_array(symbols, where + "symbols", 1, 2);
  job.channels = check_channels(job.keep_symbols.shape(1), where + "symbols");
  job.rows = check_rows(job.keep_symbols.shape(0), where + "symbols");
  job.symbols = static_cast<const uint8_t*>(job.keep_symbols.data());
  job.table = check_freqs(freqs, where + "freqs", job.channels);
  job.keep_freqs = py::reinterpret_borrow<py::array>(freqs);
  return job;
}

void run_encode(EncodeJob& job, int chunk_tokens, std::vector<uint16_t>* words) {
  std::vector<uint32_t> cums((size_t)job.channels * job.table.alphabet);
  kvc::cumulative(job.table.freqs, job.channels, job.table.alphabet, cums.data());
  const int n_chunks = (job.rows + chunk_tokens - 1) / chunk_tokens;
  job.blobs.resize(n_chunks);
  for (int i = 0; i < n_chunks && job.error.empty(); ++i) {
    const int t0 = i * chunk_tokens, rows = std::min(chunk_tokens, job.rows - t0);
    job.error = kvc::encode_blob(job.symbols + (size_t)t0 * job.channels, rows, job.channels,
                                 t0, job.table.freqs, cums.data(), job.table.alphabet, words,
                                 &job.blobs[i]);
  }
}

py::list blobs_to_python(const EncodeJob& job, const std::string& where) {
  if (!job.error.empty()) throw py::value_error(where + "symbols: " + job.error);
  py::list out;
  for (const auto& b : job.blobs) {
    out.append(py::bytes(reinterpret_cast<const char*>(b.data()), b.size()));
  }
  return out;
}

py::list encode(py::handle symbols, py::handle freqs, int chunk_tokens) {
  check_chunk_tokens(chunk_tokens);
  EncodeJob job = make_encode_job(symbols, freqs, "");
  {
    py::gil_scoped_release release;
    std::vector<uint16_t> words;
    run_encode(job, chunk_tokens, &words);
  }
  return blobs_to_python(job, "");
}

py::list encode_many(py::list items, int chunk_tokens, int threads) {
  check_chunk_tokens(chunk_tokens);
  std::vector<EncodeJob> jobs;
  jobs.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string where = "items[" + std::to_string(i) + "]: ";
    if (!py::isinstance<py::tuple>(items[i]) || py::len(items[i]) != 2) {
      throw py::value_error(where + "expected a tuple (symbols, freqs)");
    }
    py::tuple item = items[i].cast<py::tuple>();
    jobs.push_back(make_encode_job(item[0], item[1], where));
  }
  const int n_threads = resolve_threads(threads, jobs.size());
  {
    py::gil_scoped_release release;
    std::vector<std::vector<uint16_t>> words(n_threads);
    parallel_for(jobs.size(), n_threads,
                 [&](int w, size_t i) { run_encode(jobs[i], chunk_tokens, &words[w]); });
  }
  py::list out;
  for (size_t i = 0; i < jobs.size(); ++i) {
    out.append(blobs_to_python(jobs[i], "items[" + std::to_string(i) + "]: "));
  }
  return out;
}

// ---- decode ----------------------------------------------------------------------------

struct DecodeJob {
  std::vector<std::pair<const uint8_t*, size_t>> blobs;
  std::vector<py::buffer_info> keep;  // pins the blob buffers while the GIL is released
  py::array keep_out, keep_freqs;
  Table table;
  uint8_t* out;
  int rows, channels;
  std::string error;
};

void run_decode(DecodeJob& job, int chunk_tokens, std::vector<uint32_t>* lut) {
  kvc::build_decode_tables(job.table.freqs, job.channels, job.table.alphabet, lut);
  for (size_t i = 0; i < job.blobs.size(); ++i) {
    const int t0 = (int)i * chunk_tokens, rows = std::min(chunk_tokens, job.rows - t0);
    std::string err = kvc::decode_blob(job.blobs[i].first, job.blobs[i].second, rows,
                                       job.channels, lut->data(),
                                       job.out + (size_t)t0 * job.channels);
    if (!err.empty()) {
      job.error = "blob " + std::to_string(i) + ": " + err;
      return;
    }
  }
}

void prepare_decode_job(DecodeJob& job, py::handle entry, int chunk_tokens,
                        const std::string& where) {
  if (!py::isinstance<py::tuple>(entry) || py::len(entry) != 3) {
    throw py::value_error(where + "expected a tuple (blobs, freqs, out)");
  }
  py::tuple item = entry.cast<py::tuple>();
  job.keep_out = check_array(item[2], where + "out", 1, 2);
  if (!job.keep_out.writeable()) throw py::value_error(where + "out: must be writable");
  job.rows = check_rows(job.keep_out.shape(0), where + "out");
  job.channels = check_channels(job.keep_out.shape(1), where + "out");
  job.out = static_cast<uint8_t*>(job.keep_out.mutable_data());
  job.table = check_freqs(item[1], where + "freqs", job.channels);
  job.keep_freqs = py::reinterpret_borrow<py::array>(item[1]);
  if (!py::isinstance<py::list>(item[0]) && !py::isinstance<py::tuple>(item[0])) {
    throw py::value_error(where + "blobs: expected a list of bytes-like objects");
  }
  py::sequence blobs = py::reinterpret_borrow<py::sequence>(item[0]);
  const size_t expected = ((size_t)job.rows + chunk_tokens - 1) / chunk_tokens;
  if (blobs.size() != expected) {
    throw py::value_error(where + "blobs: got " + std::to_string(blobs.size()) + " blobs for " +
                          std::to_string(job.rows) + " rows; expected " +
                          std::to_string(expected));
  }
  for (size_t b = 0; b < blobs.size(); ++b) {
    const std::string name = where + "blobs[" + std::to_string(b) + "]";
    py::handle obj = blobs[b];
    if (!PyObject_CheckBuffer(obj.ptr())) {
      throw py::value_error(name + ": expected a bytes-like object");
    }
    // Zero-copy view; strides are requested so a non-contiguous view is reported.
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
    if (info.itemsize != 1 || info.ndim != 1 || (info.size > 1 && info.strides[0] != 1)) {
      throw py::value_error(name + ": must be a contiguous 1-D byte buffer");
    }
    job.blobs.emplace_back(static_cast<const uint8_t*>(info.ptr), (size_t)info.size);
    job.keep.push_back(std::move(info));
  }
}

py::list decode_many(py::list items, int chunk_tokens, int threads) {
  check_chunk_tokens(chunk_tokens);
  std::vector<DecodeJob> jobs(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    prepare_decode_job(jobs[i], items[i], chunk_tokens, "items[" + std::to_string(i) + "]: ");
  }
  const int n_threads = resolve_threads(threads, jobs.size());
  {
    py::gil_scoped_release release;
    // One table buffer per worker, not per item: memory stays threads * C * 16 KiB.
    std::vector<std::vector<uint32_t>> luts(n_threads);
    parallel_for(jobs.size(), n_threads,
                 [&](int w, size_t i) { run_decode(jobs[i], chunk_tokens, &luts[w]); });
  }
  py::list errors;
  for (auto& job : jobs) {
    if (job.error.empty()) errors.append(py::none());
    else errors.append(py::str(job.error));
  }
  return errors;
}

// ---- tables ----------------------------------------------------------------------------

py::array normalize_freqs(py::handle levels_obj) {
  py::array levels = check_array(levels_obj, "levels", 1, 2);
  const size_t n = (size_t)levels.shape(0);
  const py::ssize_t a = levels.shape(1);
  if (a < 1 || a > KVC_MAX_ALPHABET) {
    throw py::value_error("levels: alphabet must be in [1, 256], got " + std::to_string(a));
  }
  py::array_t<uint16_t> out({(py::ssize_t)n, a});
  const uint8_t* lv = static_cast<const uint8_t*>(levels.data());
  uint16_t* f = out.mutable_data();
  for (size_t i = 0; i < n; ++i) {
    for (py::ssize_t s = 0; s < a; ++s) {
      if (lv[i * a + s] > KVC_MAX_LEVEL) {
        throw py::value_error("levels: row " + std::to_string(i) + " has level " +
                              std::to_string(lv[i * a + s]) + " above 63");
      }
    }
    if (!kvc_normalize_freqs(lv + i * a, (int)a, f + i * a)) {
      throw py::value_error("levels: row " + std::to_string(i) +
                            " is all zero; at least one symbol must be present");
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kvcodec native interleaved rANS coder (CPU); bitstream in csrc/common/rans.h";
  m.attr("__version__") = "1";
  m.attr("BITSTREAM_VERSION") = KVC_BITSTREAM_VERSION;
  m.attr("PROB_BITS") = KVC_PROB_BITS;
  m.attr("LANES") = KVC_LANES;
  m.attr("MAX_LEVEL") = KVC_MAX_LEVEL;
  m.def("normalize_freqs", &normalize_freqs, py::arg("levels"),
        "uint8 levels [N, A] -> uint16 freqs [N, A], each row summing to 2**PROB_BITS.");
  m.def("encode", &encode, py::arg("symbols"), py::arg("freqs"), py::arg("chunk_tokens"),
        "Encode uint8 symbols [T, C] with uint16 per-channel tables freqs [C, A] into one "
        "blob (bytes) per chunk of chunk_tokens rows.");
  m.def("encode_many", &encode_many, py::arg("items"), py::arg("chunk_tokens"),
        py::arg("threads") = 0, "encode() over a list of (symbols, freqs), in parallel.");
  m.def("decode_many", &decode_many, py::arg("items"), py::arg("chunk_tokens"),
        py::arg("threads") = 0,
        "Decode [(blobs, freqs [C, A], out uint8 [T, C])] in parallel into the out arrays; "
        "returns None or an error message per item. Raises ValueError for bad arguments.");
  m.def("max_encoded_size",
        [](int64_t t, int64_t c) {
          if (t < 0) throw py::value_error("T: must be >= 0");
          if (c < 0) throw py::value_error("C: must be >= 0");
          return kvc_max_encoded_size((uint64_t)t, (uint64_t)c);
        },
        py::arg("T"), py::arg("C"), "Upper bound on the bytes of one blob of T x C symbols.");
}
