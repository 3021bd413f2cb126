// The thread pool of the CPU batch calls: one short-lived pool per call, since a call's
// jobs (a file's streams or chunks) are few and coarse and the caller waits for all of them.
#pragma once
#include <stddef.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace kvc {

// `threads` <= 0 means one per core; never more workers than jobs.
inline int resolve_threads(int threads, size_t jobs) {
  if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
  return (int)std::max<size_t>(1, std::min<size_t>((size_t)threads, jobs));
}

// Runs fn(i) for i in [0, n) on up to `threads` workers pulling from a shared counter; the
// calling thread is one of them.
//
// An exception escaping a std::thread calls std::terminate, which would abort the whole
// Python process (a std::bad_alloc in one job, say). So each worker catches what fn
// throws, the first exception is kept and no further items are handed out (the call has
// failed as a whole; items already running finish), and it is rethrown here on the
// calling thread once every worker has joined, where the binding turns it into a Python
// exception. A worker that cannot be started (std::system_error at the thread limit)
// leaves its share to the others instead of aborting: the result is the same, only later.
template <class F>
void parallel_for(size_t n, int threads, F fn) {
  std::atomic<size_t> next{0};
  std::mutex error_mu;
  std::exception_ptr error;
  auto work = [&]() noexcept {
    for (size_t i; (i = next.fetch_add(1)) < n;) {
      try {
        fn(i);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(error_mu);
          if (!error) error = std::current_exception();
        }
        next.store(n);  // stop handing out items
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  if (threads > 1) {
    try {
      pool.reserve((size_t)threads - 1);
      for (int k = 1; k < threads; ++k) pool.emplace_back(work);
    } catch (...) {
      // Fewer workers than asked: the started ones and this thread do all the items.
    }
  }
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace kvc
