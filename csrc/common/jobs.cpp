#include "common/jobs.h"

#include <algorithm>

#include "common/parallel.h"
#include "common/rans.h"
#include "encoder/encoder.h"

namespace kvc {

namespace {

void run_encode(const EncodeJob& job, int chunk_tokens, EncodeResult* result) {
  std::vector<uint32_t> cums((size_t)job.channels * job.table.alphabet);
  cumulative(job.table.freqs, job.channels, job.table.alphabet, cums.data());
  const int n_chunks = (job.rows + chunk_tokens - 1) / chunk_tokens;
  result->blobs.resize(n_chunks);
  for (int i = 0; i < n_chunks && result->error.empty(); ++i) {
    const int t0 = i * chunk_tokens, rows = std::min(chunk_tokens, job.rows - t0);
    result->error = encode_blob(job.symbols + (size_t)t0 * job.channels, rows, job.channels,
                                job.table.freqs, cums.data(), job.table.alphabet,
                                &result->blobs[i]);
    if (!result->error.empty()) {
      result->error = "chunk " + std::to_string(i) + ": " + result->error;
    }
  }
}

std::string run_decode(const DecodeJob& job, int chunk_tokens) {
  DecodeTables local;
  if (!job.built) build_tables(job.table.freqs, job.channels, job.table.alphabet, &local);
  const DecodeTables& tables = job.built ? *job.built : local;
  for (size_t i = 0; i < job.n_blobs; ++i) {
    const int t0 = (int)i * chunk_tokens, rows = std::min(chunk_tokens, job.rows - t0);
    std::string err = decode_blob(job.blobs[i].data, job.blobs[i].size, rows, job.channels,
                                  tables, job.out + (size_t)t0 * job.channels);
    if (!err.empty()) return "blob " + std::to_string(i) + ": " + err;
  }
  if (job.dequant) return dequant_token(job.out, job.rows, *job.dequant);
  return std::string();
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
  parallel_for(n, resolve_threads(threads, n),
               [&](size_t i) { errors[i] = run_decode(jobs[i], chunk_tokens); });
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
