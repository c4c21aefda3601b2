// What the CPU kernels share: a float vector type and its helpers, and a parallel loop over XLA:CPU's
// intra-op thread pool.
//
// Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 register, two AVX2 registers or
// four NEON registers, chosen by the compiler for the machine (-march=native).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace cgpt {

constexpr int64_t W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float x) { return x - vf{}; }  // x - 0 is exact for every x, so this folds to a broadcast
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }

// Runs body(i) for i in [0, n) on the calling thread and XLA:CPU's intra-op thread pool, each i once. Each
// thread walks its own contiguous share of [0, n), then helps with what is left of the others': items
// next to each other in memory are then read by one thread as one run (a decode step's weight streams
// faster so than with threads taking turns at neighbouring items). Atomic counters hand out the work,
// so the caller never waits for a task that has not started.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const F& body) {
  const int64_t threads = std::max<int64_t>(std::min<int64_t>(pool.num_threads(), n), 1);
  struct Shared {
    std::atomic<int64_t> done{0};
    // next[s]: the next item of share s, which holds [s·n/threads, (s+1)·n/threads)
    std::unique_ptr<std::atomic<int64_t>[]> next;
  };
  auto shared = std::make_shared<Shared>();
  shared->next.reset(new std::atomic<int64_t>[threads]);
  for (int64_t s = 0; s < threads; ++s) shared->next[s] = s * n / threads;
  auto work = [shared, n, threads, &body](int64_t own) {
    for (int64_t k = 0; k < threads; ++k) {
      const int64_t share = (own + k) % threads, end = (share + 1) * n / threads;
      for (int64_t i; (i = shared->next[share].fetch_add(1)) < end;) {
        body(i);
        shared->done.fetch_add(1);
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work, t] { work(t); });
  work(0);
  while (shared->done.load() < n) std::this_thread::yield();
}

}  // namespace cgpt
