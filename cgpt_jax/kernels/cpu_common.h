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

// Runs body(i) for i in [0, n) on the calling thread and XLA:CPU's intra-op thread pool. An atomic
// counter hands out the work, so the caller never waits for a task that has not started.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const F& body) {
  struct Shared { std::atomic<int64_t> next{0}, done{0}; };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, &body] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      body(i);
      shared->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load() < n) std::this_thread::yield();
}

}  // namespace cgpt
