// ParallelFor over XLA's own CPU thread pool (ffi::ThreadPool): the calling thread works too,
// so the handler can never deadlock waiting on a pool whose threads are all busy.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "jaxmps/ffi_common.h"

namespace jaxmps::cpu {

// Runs body(i) for i in [0, count). Work units are handed out through an atomic counter to
// the caller and up to num_threads-1 pool tasks, a grain of consecutive units per claim (about
// 16 claims per thread) so that many small units do not bounce the counter's cache line. The
// partition of work into units never depends on the thread count, so results are identical
// whatever the pool size.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t count,
                        const std::function<void(int64_t)>& body) {
  if (count <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t count = 0, grain = 1;
    const std::function<void(int64_t)>* body = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  // Shared state outlives the call: a helper task may start after the caller returned, find
  // no work left and exit, touching only `next`.
  auto shared = std::make_shared<Shared>();
  shared->count = count;
  shared->grain = std::max<int64_t>(1, count / (16 * (helpers + 1)));
  shared->body = &body;
  auto work = [](Shared& s) {
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(s.grain)) < s.count;) {
      const int64_t end = std::min(s.count, i + s.grain);
      for (int64_t j = i; j < end; ++j) (*s.body)(j);
      finished += end - i;
    }
    if (finished && s.done.fetch_add(finished) + finished == s.count) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([shared, work] { work(*shared); });
  }
  work(*shared);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == count; });
}

}  // namespace jaxmps::cpu
