#include "common/jobs.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "common/parallel.h"
#include "common/rans.h"
#include "encoder/encoder.h"

namespace kvc {

namespace {

// The first row of chunk i < chunk_count(rows, chunk_tokens): below rows, so it fits an
// int, but the product is taken in 64 bits so that it never overflows on the way there.
int chunk_start(size_t i, int chunk_tokens) { return (int)((int64_t)i * chunk_tokens); }

void run_encode(const EncodeJob& job, int chunk_tokens, EncodeResult* result) {
  std::vector<uint32_t> cums((size_t)job.channels * job.table.alphabet);
  cumulative(job.table.freqs, job.channels, job.table.alphabet, cums.data());
  const size_t n_chunks = chunk_count(job.rows, chunk_tokens);
  result->blobs.resize(n_chunks);
  for (size_t i = 0; i < n_chunks && result->error.empty(); ++i) {
    const int t0 = chunk_start(i, chunk_tokens), rows = std::min(chunk_tokens, job.rows - t0);
    result->error = encode_blob(job.symbols + (size_t)t0 * job.channels, rows, job.channels,
                                job.table.freqs, cums.data(), job.table.alphabet,
                                &result->blobs[i]);
    if (!result->error.empty()) {
      result->error = "chunk " + std::to_string(i) + ": " + result->error;
    }
  }
}

// Decodes jobs [first, last) (one work item). Their blobs go to decode_blobs a batch at a
// time, so that the AVX2 path interleaves blobs across jobs too when each job has one (a
// chunk of a stream, as the streaming loader decodes). A job with a dequantizer and no
// `out` has its blobs decoded into a scratch buffer that stays in cache and dequantized
// (and re-rotated) from there straight away, blob by blob.
void run_decode(const DecodeJob* jobs, size_t first, size_t last, int chunk_tokens,
                std::string* errors) {
  constexpr size_t BATCH = 8;
  std::vector<DecodeTables> local(last - first);
  std::vector<BlobTask> tasks;
  struct Owner {
    size_t job, blob;
    int t0;
  };
  std::vector<Owner> owner;
  for (size_t j = first; j < last; ++j) {
    const DecodeJob& job = jobs[j];
    const DecodeTables* tables = job.built;
    if (!tables) {
      build_tables(job.table.freqs, job.channels, job.table.alphabet, &local[j - first]);
      tables = &local[j - first];
    }
    for (size_t i = 0; i < job.n_blobs; ++i) {
      const int t0 = chunk_start(i, chunk_tokens), rows = std::min(chunk_tokens, job.rows - t0);
      uint8_t* out = job.out ? job.out + (size_t)t0 * job.channels : nullptr;
      tasks.push_back({job.blobs[i].data, job.blobs[i].size, rows, job.channels, tables, out,
                       std::string()});
      owner.push_back({j, i, t0});
    }
  }
  std::vector<uint8_t> scratch;
  for (size_t b = 0; b < tasks.size(); b += BATCH) {
    const size_t e = std::min(tasks.size(), b + BATCH);
    size_t need = 0;
    for (size_t i = b; i < e; ++i)
      if (!jobs[owner[i].job].out) need += (size_t)tasks[i].rows * tasks[i].channels;
    if (scratch.size() < need) scratch.resize(need);
    for (size_t i = b, at = 0; i < e; ++i) {
      if (jobs[owner[i].job].out) continue;
      tasks[i].out = scratch.data() + at;
      at += (size_t)tasks[i].rows * tasks[i].channels;
    }
    decode_blobs(tasks.data() + b, e - b);
    for (size_t i = b; i < e; ++i) {
      const DecodeJob& job = jobs[owner[i].job];
      std::string& err = errors[owner[i].job];
      if (!err.empty()) continue;  // a job reports its first bad blob
      if (!tasks[i].error.empty()) {
        err = "blob " + std::to_string(owner[i].blob) + ": " + tasks[i].error;
      } else if (job.dequant && !job.out) {
        err = dequant_token(tasks[i].out, tasks[i].rows, *job.dequant, owner[i].t0);
      }
    }
  }
  for (size_t j = first; j < last; ++j) {  // whole-stream symbols: dequantized at the end
    if (errors[j].empty() && jobs[j].dequant && jobs[j].out)
      errors[j] = dequant_token(jobs[j].out, jobs[j].rows, *jobs[j].dequant);
  }
}

std::string normalize_rows(const LevelRows& t) {
  const int a = t.alphabet;
  for (size_t r = 0; r < t.n; ++r) {
    if (!normalize_freqs(t.levels + r * a, a, t.freqs + r * a))
      return "row " + std::to_string(r) + " has no present symbol or a level above 63";
  }
  return std::string();
}

}  // namespace

void encode_many(const EncodeJob* jobs, size_t n, int chunk_tokens, int threads,
                 EncodeResult* results) {
  parallel_for(n, resolve_threads(threads, n),
               [&](size_t i) { run_encode(jobs[i], chunk_tokens, &results[i]); });
}

void build_decode_tables(const FreqTable* tables, size_t n, int threads,
                         DecodeTables* const* out) {
  parallel_for(n, resolve_threads(threads, n), [&](size_t i) {
    build_tables(tables[i].freqs, tables[i].channels, tables[i].alphabet, out[i]);
  });
}

void decode_many(const DecodeJob* jobs, size_t n, int chunk_tokens, int threads,
                 std::string* errors) {
  // Work items: runs of consecutive jobs, closed once they hold a whole number of the
  // SIMD decoder's groups (its interleave of blobs), or four groups and a part, so that
  // one-chunk jobs still decode together and jobs of a few chunks each (three, as a
  // stream loads) leave no group short; smaller groups (down to 4) where that would
  // leave threads without an item.
  size_t total = 0;
  for (size_t j = 0; j < n; ++j) total += jobs[j].n_blobs;
  const size_t workers = (size_t)resolve_threads(threads, n);
  size_t group = (size_t)decode_interleave();
  while (group > 4 && total < group * workers) group /= 2;
  std::vector<size_t> starts;
  for (size_t j = 0, blobs = group; j < n; ++j) {
    if (blobs >= group && (blobs % group == 0 || blobs > 4 * group)) {
      starts.push_back(j);
      blobs = 0;
    }
    blobs += jobs[j].n_blobs;
  }
  starts.push_back(n);
  const size_t items = starts.size() - 1;
  parallel_for(items, resolve_threads(threads, items), [&](size_t i) {
    run_decode(jobs, starts[i], starts[i + 1], chunk_tokens, errors);
  });
}

void stream_tables_many(TablesJob* jobs, size_t n, int threads) {
  parallel_for(n, resolve_threads(threads, n), [&](size_t i) {
    TablesJob& j = jobs[i];
    j.error = stream_tables(j.symbols, j.rows, j.channels, j.alphabet, j.groups, j.freqs,
                            j.spans, &j.codes);
  });
}

void stream_inputs_many(InputJob* jobs, size_t n, int threads) {
  parallel_for(n, resolve_threads(threads, n), [&](size_t i) {
    InputJob& j = jobs[i];
    j.finite = stream_input(j.x, j.head_stride, j.heads, j.rows, j.head_dim, j.cos, j.sin,
                            j.rotary_dim, j.divisor, j.out);
  });
}

void quantize_many(const QuantizeJob* jobs, size_t n, int threads) {
  parallel_for(n, resolve_threads(threads, n), [&](size_t i) {
    const QuantizeJob& j = jobs[i];
    if (j.code) {
      quantize_token(j.x, j.code, j.rows, j.channels, j.grid, j.mult, j.param, j.out);
    } else {
      quantize_absmax(j.x, j.inv, j.rows, j.channels, j.param, j.out);
    }
  });
}

void normalize_many(const LevelRows* rows, size_t n, int threads, std::string* errors) {
  parallel_for(n, resolve_threads(threads, n),
               [&](size_t i) { errors[i] = normalize_rows(rows[i]); });
}

}  // namespace kvc
