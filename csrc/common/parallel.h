// The thread pool of the CPU batch calls: one short-lived pool per call, since a call's
// jobs (a file's streams or chunks) are few and coarse and the caller waits for all of them.
#pragma once
#include <stddef.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

namespace kvc {

// `threads` <= 0 means one per core; never more workers than jobs.
inline int resolve_threads(int threads, size_t jobs) {
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

}  // namespace kvc
