// y = x · W for the few rows x of a decode step, reading the weight W once as a stream, as XLA FFI handlers
// for XLA:CPU. W is float32, or weight-only quantized (int8, or int4 packed two per byte) with float32 scales.
//
// Why: with a handful of rows a matmul does 1–16 multiply-adds per weight it reads, so its speed is the
// speed at which W streams from memory. XLA:CPU's GEMM on [2, 768] x [768, 3072] reads W well below that,
// and for a quantized W it writes the dequantized float32 weight out and reads it back. Here W splits into
// work items that each read their part of W in contiguous runs, once, converting each piece of W to float
// in registers once for all rows of x.
//
// Layouts (row-major): x [M, K] float32, y [M, N] float32. W is either
//   KN (a projection, W [K, N]): w [K, N] float32 or int8, or [K, N/2] uint8 (int4), scale [G, N];
//   NK (the tied LM head, W stored [N, K] and used transposed): w [N, K], or [N, K/2], scale [N, G].
// 4-bit values are packed two per byte along the stored last axis, the low nibble first, two's complement.
// K splits into G groups of g = K/G consecutive inputs, each with its own scale per output; W[k, n] =
// q[k, n] · scale[k / g, n]. Products and sums are float32, as on XLA's path. With one group the scale is
// applied once per output after the sum, otherwise to each converted vector of weights.
//
// KN: the work splits into column chunks narrow enough that the partial sums of all M rows stay in L1
// cache, and K into parts (whole groups), so that each thread has several items and an item reads each of
// its weight rows' part of the chunk as one contiguous run; 8 weight rows at a time, each weight vector
// converted once and used by all M rows. A float32 W against one row of x is read one weight row after
// another instead: a single stream through memory, where each row's sums cost one load and one store.
// The parts' sums are added up at the end. An int4 vector holds 16 even and 16 odd columns (the low and
// high nibbles); the sums keep them apart and the columns are put back in order when y is written.
// Panels (W [K, N] stored [N/64, K, 64], as the generator lays out its projections): see "Panels" below.
// NK: 4 stored rows of W at a time (contiguous in memory) against up to 4 rows of x in registers, one
// horizontal sum per output. For int4 the inputs of x are reordered once per call into the nibbles' order
// (per 32 inputs: the 16 even ones, then the 16 odd ones), so that no weight needs shuffling.
#include <vector>

#include "cpu_common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using namespace cgpt;

typedef int8_t vb __attribute__((vector_size(W)));

constexpr int C = 4;       // NK: stored weight rows (outputs) per block
constexpr int R = 4;       // NK: rows of x per block, R·C accumulators in registers
constexpr int KB = 8;      // KN: weight rows per step, so each partial sum is loaded and stored once per 8
constexpr int64_t CHUNKS_PER_THREAD = 4;  // work items per thread: balance when a core is busy elsewhere

struct Problem {
  int64_t M, K, N, G, g;
  int bits;             // 32 (float32 weights), 8 or 4
  const void* w;
  const float* scale;   // nullptr for float32 weights
  const float* x;       // [M, K]; NK int4: inputs reordered (`reorder_for_int4`)
  float* y;
};

// Inputs (NK) or columns (KN) per vector of stored weights: 16 float32 or int8 values, 32 int4 values.
constexpr int64_t step_of(int bits) { return bits == 4 ? 2 * W : W; }

// W[k, n] (KN) or W[n, k] stored (NK), dequantized, element by element: the tails of K or N and groups that
// are not a whole number of vectors.
inline float weight_at(const Problem& p, bool nk, int64_t k, int64_t n) {
  const int64_t index = nk ? n * p.K + k : k * p.N + n;  // in the unpacked stored weight
  if (p.bits == 32) return static_cast<const float*>(p.w)[index];
  int value;
  if (p.bits == 8) {
    value = static_cast<const int8_t*>(p.w)[index];
  } else {
    const int8_t byte = static_cast<const int8_t*>(p.w)[index / 2];
    value = index % 2 ? byte >> 4 : static_cast<int8_t>(byte << 4) >> 4;
  }
  return value * (nk ? p.scale[n * p.G + k / p.g] : p.scale[(k / p.g) * p.N + n]);
}

// 16 int8 at p, sign-extended. GCC turns the portable conversion into one scalar extension per byte,
// hence the AVX-512 instruction where there is one.
inline vi widen(const int8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vb bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  return __builtin_convertvector(bytes, vi);
#endif
}

// The 16 (float32, int8) or 32 (int4: low nibbles, then high nibbles) values of the vector at `at`, as float.
template <int BITS>
inline void weight_vectors(const void* w, int64_t at, vf* out) {
  if constexpr (BITS == 32) {
    out[0] = load(static_cast<const float*>(w) + at);
  } else {
    const vi v = widen(static_cast<const int8_t*>(w) + (BITS == 4 ? at / 2 : at));
    if constexpr (BITS == 8) {
      out[0] = __builtin_convertvector(v, vf);
    } else {
      out[0] = __builtin_convertvector((v << 28) >> 28, vf);
      out[1] = __builtin_convertvector(v >> 4, vf);
    }
  }
}

constexpr int parts_of(int bits) { return bits == 4 ? 2 : 1; }

// Asks for the cache line holding weight element `at` (of the unpacked stored weight) ahead of its use:
// the hardware prefetcher follows one long stream well but not the short runs of many rows at once.
template <int BITS>
inline void prefetch_weight(const void* w, int64_t at) {
  __builtin_prefetch(static_cast<const char*>(w) + at * BITS / 8);
}

// Whether column or input `c` (of a run that starts on a cache line) begins a cache line of weights.
template <int BITS>
inline bool starts_line(int64_t c) { return c * BITS / 8 % 64 == 0; }

// 32 consecutive floats → (the 16 at even positions, the 16 at odd positions), and back.
inline void split_even_odd(const float* p, vf& even, vf& odd) {
  const vf a = load(p), b = load(p + W);
  even = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  odd = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline void merge_even_odd(vf even, vf odd, float* p) {
  store(p, __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
  store(p + W, __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// y[m0..m1-1, n0..n1-1] (whole vectors; int4: whole 32s) from the sums as they are kept (int4: per 32
// columns the even ones, then the odd ones): put in order and scaled by a per-channel scale.
template <int BITS>
void finish(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, bool scale_after) {
  for (int64_t m = m0; m < m1; ++m) {
    float* y = p.y + m * p.N;
    if constexpr (BITS == 4)
      for (int64_t c = n0; c < n1; c += 2 * W) merge_even_odd(load(y + c), load(y + c + W), y + c);
    if (scale_after)
      for (int64_t c = n0; c < n1; c += W) store(y + c, load(y + c) * load(p.scale + c));
  }
}

// --- KN ---

// sums[m0 + r, i·W ..] += Σ_j x[m0 + r, k0 + j] · w[j][i] for r < RB: RB independent chains of additions.
template <int RB, int ROWS, int P>
inline void kn_accumulate(const Problem& p, const vf (&w)[ROWS][P], int64_t m0, int64_t k0, float* sums, int64_t ld) {
  for (int i = 0; i < P; ++i) {
    vf acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = load(sums + r * ld + i * W);
    for (int j = 0; j < ROWS; ++j)
      for (int r = 0; r < RB; ++r) acc[r] += splat(p.x[(m0 + r) * p.K + k0 + j]) * w[j][i];
    for (int r = 0; r < RB; ++r) store(sums + r * ld + i * W, acc[r]);
  }
}

// sums[m, c] += Σ_{k in [k0, k0 + ROWS)} x[m, k] · W[k, n0 + c] for c < width (a whole number of vectors),
// sums' rows `ld` apart; the weight vectors scaled by `group`'s scales when SCALE_EACH.
template <int BITS, int ROWS, bool SCALE_EACH>
inline void kn_rows(const Problem& p, int64_t k0, int64_t group, int64_t n0, int64_t width, float* sums, int64_t ld) {
  constexpr int P = parts_of(BITS);
  for (int64_t c = 0; c < width; c += step_of(BITS)) {
    vf w[ROWS][P];
    for (int j = 0; j < ROWS; ++j) weight_vectors<BITS>(p.w, (k0 + j) * p.N + n0 + c, w[j]);
    if (starts_line<BITS>(c))  // the same columns of the next ROWS weight rows
      for (int j = 0; j < ROWS && k0 + ROWS + j < p.K; ++j) prefetch_weight<BITS>(p.w, (k0 + ROWS + j) * p.N + n0 + c);
    if constexpr (SCALE_EACH) {
      vf s[P];
      if constexpr (BITS == 4) split_even_odd(p.scale + group * p.N + n0 + c, s[0], s[1]);
      else s[0] = load(p.scale + group * p.N + n0 + c);
      for (int j = 0; j < ROWS; ++j)
        for (int i = 0; i < P; ++i) w[j][i] *= s[i];
    }
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) kn_accumulate<4, ROWS, P>(p, w, m, k0, sums + m * ld + c, ld);
    for (; m + 2 <= p.M; m += 2) kn_accumulate<2, ROWS, P>(p, w, m, k0, sums + m * ld + c, ld);
    if (m < p.M) kn_accumulate<1, ROWS, P>(p, w, m, k0, sums + m * ld + c, ld);
  }
}

// sums[m, c] = Σ_{k in [k0, k1)} x[m, k] · W[k, n0 + c], ROWS weight rows at a time within each group (with
// SCALE_EACH, k0 and k1 are group boundaries).
template <int BITS, bool SCALE_EACH, int ROWS>
void kn_part(const Problem& p, int64_t k0, int64_t k1, int64_t n0, int64_t width, float* sums, int64_t ld) {
  for (int64_t m = 0; m < p.M; ++m) std::fill(sums + m * ld, sums + m * ld + width, 0.0f);
  for (int64_t begin = k0, end; begin < k1; begin = end) {
    const int64_t group = begin / p.g;
    end = SCALE_EACH ? (group + 1) * p.g : k1;
    int64_t k = begin;
    for (; k + ROWS <= end; k += ROWS) kn_rows<BITS, ROWS, SCALE_EACH>(p, k, group, n0, width, sums, ld);
    for (; k < end; ++k) kn_rows<BITS, 1, SCALE_EACH>(p, k, group, n0, width, sums, ld);
  }
}

// y[:, n0..N-1], the columns past the last whole vector, element by element.
void kn_tail(const Problem& p, int64_t n0) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = n0; n < p.N; ++n) {
      float sum = 0;
      for (int64_t k = 0; k < p.K; ++k) sum += p.x[m * p.K + k] * weight_at(p, false, k, n);
      p.y[m * p.N + n] = sum;
    }
}

// The work splits into column chunks narrow enough that the partial sums of all M rows stay in L1 cache,
// and K into parts (whole groups) so that every thread has several items: an item reads its rows' parts of
// the chunk, each a contiguous run of memory, once. The parts' sums are added up at the end.
constexpr int64_t SUMS_IN_L1 = 4096;  // floats

template <int BITS>
void kn(ffi::ThreadPool& pool, const Problem& p) {
  const int64_t vectors_end = p.N / step_of(BITS) * step_of(BITS);
  const int64_t widest = std::max<int64_t>(64, SUMS_IN_L1 / p.M / 64 * 64);
  const int64_t chunks = (vectors_end + widest - 1) / widest;  // of equal widths, whole cache lines
  const int64_t width = std::max<int64_t>(64, (vectors_end / std::max<int64_t>(chunks, 1) + 63) / 64 * 64);
  const bool scale_each = p.scale != nullptr && p.G > 1;
  const int64_t granule = scale_each ? p.g : KB;  // the parts' boundaries
  const int64_t wanted = CHUNKS_PER_THREAD * pool.num_threads();
  const int64_t parts_wanted = std::clamp<int64_t>((wanted + chunks - 1) / std::max<int64_t>(chunks, 1), 1,
                                                   (p.K + granule - 1) / granule);
  const int64_t part_len = ((p.K + parts_wanted - 1) / parts_wanted + granule - 1) / granule * granule;
  const int64_t parts = (p.K + part_len - 1) / part_len;
  // Each item's sums contiguous, [M, width]: rows of sums a multiple of 4 KiB apart would share cache sets.
  thread_local std::vector<float> memory;
  if ((int64_t)memory.size() < parts * chunks * p.M * width) memory.resize(parts * chunks * p.M * width);
  float* partial = memory.data();  // thread_local: the caller's, handed to the helpers by pointer
  auto sums_of = [&](int64_t part, int64_t chunk) { return partial + (part * chunks + chunk) * p.M * width; };
  parallel_for(pool, parts * chunks + 1, [&](int64_t i) {
    if (i == parts * chunks) {
      kn_tail(p, vectors_end);
      return;
    }
    const int64_t part = i / chunks, chunk = i % chunks, n0 = chunk * width;
    const int64_t k0 = part * part_len, k1 = std::min(p.K, k0 + part_len);
    const int64_t columns = std::min(width, vectors_end - n0);
    if (scale_each) kn_part<BITS, true, KB>(p, k0, k1, n0, columns, sums_of(part, chunk), width);
    else if (BITS == 32 && p.M == 1) kn_part<BITS, false, 1>(p, k0, k1, n0, columns, sums_of(part, chunk), width);
    else kn_part<BITS, false, KB>(p, k0, k1, n0, columns, sums_of(part, chunk), width);
  });
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t c = 0; c < vectors_end; c += W) {
      const int64_t at = m * width + c % width;
      vf sum = load(sums_of(0, c / width) + at);
      for (int64_t part = 1; part < parts; ++part) sum += load(sums_of(part, c / width) + at);
      store(p.y + m * p.N + c, sum);
    }
  finish<BITS>(p, 0, p.M, 0, vectors_end, p.scale != nullptr && !scale_each);
}

// --- NK ---

// The sums of the lanes of a, b, c and d, as lanes 0, 4, 8 and 12: halving additions, 3 shuffles each.
inline vf hsum4(vf a, vf b, vf c, vf d) {
  const vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf abcd = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const vf pairs = abcd + __builtin_shufflevector(abcd, abcd, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return pairs + __builtin_shufflevector(pairs, pairs, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}

// acc[r][c] = x[r0 + r, :K'] · (stored row rows[c])[:K'] for float32 weights, K' the whole vectors, one
// stored row after another: the C rows, contiguous in memory, are read as one stream. Two chains of
// additions per row of x, so that the additions' latency does not bound the stream. For all of x's rows
// at once (M <= R).
// Both ways are always inlined, so that acc stays in registers.
template <int ROWS>
__attribute__((always_inline)) inline void nk_sums_row_by_row(const Problem& p, const int64_t (&rows)[C], int64_t r0,
                                                              vf (&acc)[ROWS][C]) {
  const int64_t vectors_end = p.K / W * W;
  const float* w = static_cast<const float*>(p.w);
  for (int c = 0; c < C; ++c) {
    vf even[ROWS] = {}, odd[ROWS] = {};
    auto add = [&](int64_t k, vf (&into)[ROWS]) {
      const vf weights = load(w + rows[c] * p.K + k);
      for (int r = 0; r < ROWS; ++r) into[r] += load(p.x + (r0 + r) * p.K + k) * weights;
    };
    int64_t k = 0;
    for (; k + 2 * W <= vectors_end; k += 2 * W) {
      add(k, even);
      add(k + W, odd);
    }
    if (k < vectors_end) add(k, even);
    for (int r = 0; r < ROWS; ++r) acc[r][c] = even[r] + odd[r];
  }
}

// The same sums, the C stored rows interleaved: each vector of x is loaded once for all C of them, which
// is faster where the block is read again for each further R rows of x (M > R), from L1 cache.
template <int BITS, int ROWS, bool SCALE_EACH>
__attribute__((always_inline)) inline void nk_sums_interleaved(const Problem& p, const int64_t (&rows)[C], int64_t r0,
                                                             vf (&acc)[ROWS][C]) {
  constexpr int P = parts_of(BITS);
  constexpr int64_t S = step_of(BITS);
  const int64_t vectors_end = p.K / S * S;
  for (int64_t group = 0; group < (SCALE_EACH ? p.G : 1); ++group) {
    vf s[C];
    if constexpr (SCALE_EACH)
      for (int c = 0; c < C; ++c) s[c] = splat(p.scale[rows[c] * p.G + group]);
    const int64_t begin = SCALE_EACH ? group * p.g : 0, end = SCALE_EACH ? (group + 1) * p.g : vectors_end;
    for (int64_t k = begin; k < end; k += S) {
      vf w[C][P];
      if (starts_line<BITS>(k))  // the same inputs of the next block of stored rows
        for (int c = 0; c < C && rows[c] + C < p.N; ++c) prefetch_weight<BITS>(p.w, (rows[c] + C) * p.K + k);
      for (int c = 0; c < C; ++c) {
        weight_vectors<BITS>(p.w, rows[c] * p.K + k, w[c]);
        if constexpr (SCALE_EACH)
          for (int i = 0; i < P; ++i) w[c][i] *= s[c];
      }
      for (int r = 0; r < ROWS; ++r) {
        const float* xr = p.x + (r0 + r) * p.K + k;
        for (int i = 0; i < P; ++i) {
          const vf xv = load(xr + i * W);
          for (int c = 0; c < C; ++c) acc[r][c] += xv * w[c][i];
        }
      }
    }
  }
}

// y[r0..r0+ROWS-1, n0..n0+count-1] = x · (stored rows n0..)ᵀ: whole vectors in registers, the inputs past
// them element by element. The weight rows are p.w's rows w_row0.. (n0.., or 0.. of a dequantized block); a
// block past N (count < C) reads its last row again and stores only `count` outputs.
template <int BITS, int ROWS, bool SCALE_EACH, bool ROW_BY_ROW>
void nk_block(const Problem& p, int64_t w_row0, int64_t r0, int64_t n0, int64_t count) {
  const int64_t vectors_end = p.K / step_of(BITS) * step_of(BITS);
  int64_t rows[C];
  for (int c = 0; c < C; ++c) rows[c] = w_row0 + std::min<int64_t>(c, count - 1);
  vf acc[ROWS][C] = {};
  if constexpr (ROW_BY_ROW) {
    static_assert(BITS == 32 && !SCALE_EACH, "row by row is for float32 weights");
    nk_sums_row_by_row<ROWS>(p, rows, r0, acc);
  } else {
    nk_sums_interleaved<BITS, ROWS, SCALE_EACH>(p, rows, r0, acc);
  }
  const bool scale_after = p.scale != nullptr && !SCALE_EACH;
  for (int r = 0; r < ROWS; ++r) {
    const vf sums = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    for (int c = 0; c < count; ++c) {
      float tail = 0;  // inputs past the last whole vector, in their natural order
      for (int64_t k = vectors_end; k < p.K; ++k) tail += p.x[(r0 + r) * p.K + k] * weight_at(p, true, k, rows[c]);
      const float sum = scale_after ? sums[4 * c] * p.scale[rows[c]] : sums[4 * c];
      p.y[(r0 + r) * p.N + n0 + c] = sum + tail;
    }
  }
}

// y[r0..r0+ROWS-1, n] for the stored rows n in [n0, n0 + count), element by element (groups that are not a
// whole number of vectors).
void nk_elementwise(const Problem& p, const float* x_natural, int64_t n0, int64_t count) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = n0; n < n0 + count; ++n) {
      float sum = 0;
      for (int64_t k = 0; k < p.K; ++k) sum += x_natural[m * p.K + k] * weight_at(p, true, k, n);
      p.y[m * p.N + n] = sum;
    }
}

// Stored rows n0.. (count of them, the last repeated up to C) dequantized into rows [C, K] of float32, in
// x's order: the whole vectors as `weight_vectors` gives them (int4: reordered), then the tail.
template <int BITS>
void nk_dequantize(const Problem& p, int64_t n0, int64_t count, float* rows) {
  constexpr int64_t S = step_of(BITS);
  const int64_t vectors_end = p.K / S * S;
  for (int c = 0; c < C; ++c) {
    const int64_t n = n0 + std::min<int64_t>(c, count - 1);
    float* row = rows + c * p.K;
    for (int64_t k = 0; k < vectors_end; k += S) {  // a group is one or a whole number of vectors
      vf w[parts_of(BITS)];
      weight_vectors<BITS>(p.w, n * p.K + k, w);
      const vf s = splat(p.scale[n * p.G + k / p.g]);
      for (int i = 0; i < parts_of(BITS); ++i) store(row + k + i * W, w[i] * s);
    }
    for (int64_t k = vectors_end; k < p.K; ++k) row[k] = weight_at(p, true, k, n);
  }
}

// y[:, block..block+count-1] for all rows of x: blocks of R rows in registers, then the rest. Float32
// weights against at most R rows are read one stored row after another (`nk_sums_row_by_row`); quantized
// ones not, as their conversion, not the stream, bounds them, and the interleaved order converts less.
template <int BITS, bool SCALE_EACH>
void nk_all_rows(const Problem& p, int64_t w_row0, int64_t block, int64_t count) {
  if constexpr (BITS == 32 && !SCALE_EACH) switch (p.M) {
    case 1: return nk_block<BITS, 1, SCALE_EACH, true>(p, w_row0, 0, block, count);
    case 2: return nk_block<BITS, 2, SCALE_EACH, true>(p, w_row0, 0, block, count);
    case 3: return nk_block<BITS, 3, SCALE_EACH, true>(p, w_row0, 0, block, count);
    case 4: return nk_block<BITS, 4, SCALE_EACH, true>(p, w_row0, 0, block, count);
  }
  int64_t r0 = 0;
  for (; r0 + R <= p.M; r0 += R) nk_block<BITS, R, SCALE_EACH, false>(p, w_row0, r0, block, count);
  switch (p.M - r0) {
    case 1: nk_block<BITS, 1, SCALE_EACH, false>(p, w_row0, r0, block, count); break;
    case 2: nk_block<BITS, 2, SCALE_EACH, false>(p, w_row0, r0, block, count); break;
    case 3: nk_block<BITS, 3, SCALE_EACH, false>(p, w_row0, r0, block, count); break;
  }
}

// y[:, n0..n0+count-1], C stored rows at a time. With more than R rows of x a quantized block is first
// dequantized into a buffer in L1 cache, so that it is converted once rather than once per R rows.
template <int BITS, bool SCALE_EACH>
void nk_rows(const Problem& p, int64_t n0, int64_t count) {
  const bool buffered = BITS != 32 && p.M > R;
  thread_local std::vector<float> memory;
  if (buffered && (int64_t)memory.size() < C * p.K) memory.resize(C * p.K);
  Problem dequantized = p;  // the buffer as a float32 weight of C rows, scales applied
  dequantized.bits = 32;
  dequantized.w = memory.data();
  dequantized.scale = nullptr;
  for (int64_t block = n0; block < n0 + count; block += C) {
    const int64_t outputs = std::min<int64_t>(C, n0 + count - block);
    if (buffered) {
      nk_dequantize<BITS>(p, block, outputs, memory.data());
      nk_all_rows<32, false>(dequantized, 0, block, outputs);
    } else {
      nk_all_rows<BITS, SCALE_EACH>(p, block, block, outputs);
    }
  }
}

// x's inputs in the order of an int4 vector's values: per 32 inputs the 16 even ones, then the 16 odd
// ones; the inputs past the last 32 as they are.
void reorder_for_int4(const float* x, int64_t M, int64_t K, float* out) {
  const int64_t vectors_end = K / (2 * W) * (2 * W);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float* to = out + m * K;
    for (int64_t k = 0; k < vectors_end; k += 2 * W) {
      vf even, odd;
      split_even_odd(row + k, even, odd);
      store(to + k, even);
      store(to + k + W, odd);
    }
    std::copy(row + vectors_end, row + K, to + vectors_end);
  }
}

template <int BITS>
void nk(ffi::ThreadPool& pool, Problem p) {
  const float* x_natural = p.x;
  thread_local std::vector<float> reordered;
  if (BITS == 4) {
    if ((int64_t)reordered.size() < p.M * p.K) reordered.resize(p.M * p.K);
    reorder_for_int4(p.x, p.M, p.K, reordered.data());
    p.x = reordered.data();
  }
  const bool scale_each = p.scale != nullptr && p.G > 1;
  const bool elementwise = scale_each && p.g % step_of(BITS) != 0;
  const int64_t items = CHUNKS_PER_THREAD * pool.num_threads();
  const int64_t rows_per_item = std::max<int64_t>(C, (p.N / items + C - 1) / C * C);
  parallel_for(pool, (p.N + rows_per_item - 1) / rows_per_item, [&](int64_t i) {
    const int64_t n0 = i * rows_per_item, count = std::min(rows_per_item, p.N - n0);
    if (elementwise) nk_elementwise(p, x_natural, n0, count);
    else if (scale_each) nk_rows<BITS, true>(p, n0, count);
    else nk_rows<BITS, false>(p, n0, count);
  });
}

// --- Panels ---

// W [K, N] stored as panels [N/T, K, T]: each panel, T consecutive columns over all K rows, is one
// contiguous run of memory. An item reads its panel's rows one after another, a single stream, into
// T/W sums per row of x held in registers over a segment of rows: the partial sums go through memory
// once per segment, not once per vector of weights. With many rows of x (a prefill) the segment, in L1
// cache, meets blocks of 6 rows of x: 24 sums in registers, enough multiply-adds per weight loaded to
// keep up with XLA's GEMM.
constexpr int64_t T = 64;           // columns per panel: 4 vectors of sums per row of x
constexpr int64_t SEGMENT = 64;     // rows of a panel per pass over the rows of x
constexpr int V = T / W;            // vectors per panel row
constexpr int64_t RANGE = 192;      // rows of x per item at most: their inputs and sums for a segment in L1/L2

// The V vectors of panel row k (index into the unpacked stored weight: `at`) as float; int4 as `weight_vectors`
// gives them (per 32 columns: the 16 even ones, then the 16 odd ones).
template <int BITS>
inline void panel_row(const void* w, int64_t at, vf (&out)[V]) {
  for (int64_t c = 0, i = 0; c < T; c += step_of(BITS), i += parts_of(BITS)) weight_vectors<BITS>(w, at + c, out + i);
}

// out[m0 + r, 0..T) += Σ_{k in [k0, k1)} x[m0 + r, k] · panel[k, :] (· scale, when given), for r < RB;
// the panel's row k at element panel_at + k·T of the stored weight, out's rows `ld` apart. With one or
// two rows of x, two sets of sums take alternate rows of the panel, so that the additions' latency does
// not bound the stream.
template <int BITS, int RB>
inline void panel_segment(const Problem& p, int64_t panel_at, int64_t k0, int64_t k1, int64_t m0,
                          const vf (*scale)[V], float* out, int64_t ld) {
  constexpr int SETS = RB <= 2 ? 2 : 1;
  vf acc[SETS][RB][V] = {};
  auto add = [&](int set, int64_t k) {
    vf w[V];
    panel_row<BITS>(p.w, panel_at + k * T, w);
    for (int r = 0; r < RB; ++r) {
      const vf xs = splat(p.x[(m0 + r) * p.K + k]);
      for (int i = 0; i < V; ++i) acc[set][r][i] += xs * w[i];
    }
  };
  int64_t k = k0;
  for (; k + SETS <= k1; k += SETS)
    for (int set = 0; set < SETS; ++set) add(set, k + set);
  for (; k < k1; ++k) add(0, k);
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < V; ++i) {
      vf sum = acc[0][r][i];
      if constexpr (SETS == 2) sum += acc[1][r][i];
      if (scale != nullptr) sum *= (*scale)[i];
      float* at = out + (m0 + r) * ld + i * W;
      store(at, load(at) + sum);
    }
}

// out[m, 0..T) = Σ_{k in [k0, k1)} x[m, k] · W[k, panel's columns] for m in [m0, m1): segments of SEGMENT
// rows (or one scale group each, scaled as a whole), each against blocks of 6 rows of x, then the rest.
template <int BITS>
void panel_item(const Problem& p, int64_t panel, int64_t k0, int64_t k1, int64_t m0, int64_t m1, bool scale_each,
                float* out, int64_t ld) {
  for (int64_t m = m0; m < m1; ++m) std::fill(out + m * ld, out + m * ld + T, 0.0f);
  const int64_t panel_at = panel * p.K * T, n0 = panel * T;
  for (int64_t begin = k0, end; begin < k1; begin = end) {
    end = std::min(k1, begin + (scale_each ? p.g : SEGMENT));
    vf scale[V];
    if (scale_each) {
      const float* s = p.scale + begin / p.g * p.N + n0;
      for (int i = 0; i < V; ++i) {
        if constexpr (BITS == 4) { if (i % 2 == 0) split_even_odd(s + i * W, scale[i], scale[i + 1]); }
        else scale[i] = load(s + i * W);
      }
    }
    const vf (*scaled)[V] = scale_each ? &scale : nullptr;
    int64_t m = m0;
    for (; m + 6 <= m1; m += 6) panel_segment<BITS, 6>(p, panel_at, begin, end, m, scaled, out, ld);
    switch (m1 - m) {
      case 1: panel_segment<BITS, 1>(p, panel_at, begin, end, m, scaled, out, ld); break;
      case 2: panel_segment<BITS, 2>(p, panel_at, begin, end, m, scaled, out, ld); break;
      case 3: panel_segment<BITS, 3>(p, panel_at, begin, end, m, scaled, out, ld); break;
      case 4: panel_segment<BITS, 4>(p, panel_at, begin, end, m, scaled, out, ld); break;
      case 5: panel_segment<BITS, 5>(p, panel_at, begin, end, m, scaled, out, ld); break;
    }
  }
}

// Items are panels; where there are fewer panels than the threads want, each panel's rows of x split
// into ranges (many rows: a prefill), or else its K into parts (whole segments or groups) whose sums are
// added up at the end.
template <int BITS>
void panels(ffi::ThreadPool& pool, const Problem& p) {
  const int64_t count = p.N / T;
  const bool scale_each = p.scale != nullptr && p.G > 1, scale_after = p.scale != nullptr && !scale_each;
  const int64_t wanted = CHUNKS_PER_THREAD * pool.num_threads(), splits = (wanted + count - 1) / count;
  if (splits == 1 || p.M >= 12 * splits) {  // row ranges of whole blocks of 6 rows, at most RANGE
    const int64_t range = std::min(RANGE, (p.M + 6 * splits - 1) / (6 * splits) * 6), ranges = (p.M + range - 1) / range;
    parallel_for(pool, ranges * count, [&](int64_t i) {
      const int64_t panel = i % count, m0 = i / count * range, m1 = std::min(p.M, m0 + range);
      panel_item<BITS>(p, panel, 0, p.K, m0, m1, scale_each, p.y + panel * T, p.N);
      finish<BITS>(p, m0, m1, panel * T, panel * T + T, scale_after);
    });
    return;
  }
  const int64_t granule = scale_each ? p.g : SEGMENT;
  const int64_t parts_wanted = std::min<int64_t>(splits, (p.K + granule - 1) / granule);
  const int64_t part_len = ((p.K + parts_wanted - 1) / parts_wanted + granule - 1) / granule * granule;
  const int64_t parts = (p.K + part_len - 1) / part_len;
  thread_local std::vector<float> memory;  // the parts' sums, [parts, M, N]
  if ((int64_t)memory.size() < parts * p.M * p.N) memory.resize(parts * p.M * p.N);
  float* sums = memory.data();
  parallel_for(pool, parts * count, [&](int64_t i) {
    const int64_t panel = i / parts, part = i % parts, k0 = part * part_len;  // a panel's parts lie in order
    panel_item<BITS>(p, panel, k0, std::min(p.K, k0 + part_len), 0, p.M, scale_each, sums + part * p.M * p.N + panel * T,
                     p.N);
  });
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t c = 0; c < p.N; c += W) {
      vf sum = load(sums + m * p.N + c);
      for (int64_t part = 1; part < parts; ++part) sum += load(sums + (part * p.M + m) * p.N + c);
      store(p.y + m * p.N + c, sum);
    }
  finish<BITS>(p, 0, p.M, 0, p.N, scale_after);
}

// --- The handlers ---

using Matrix = ffi::Buffer<ffi::F32, 2>;  // aliases: the handler macros below split a comma in a template
using ResultMatrix = ffi::ResultBuffer<ffi::F32, 2>;

// Points p at the buffers (p.M, K, N and G set); false, with y written, where there is nothing to multiply.
bool bind(Problem& p, Matrix x, ffi::AnyBuffer w, const float* scale, ResultMatrix y) {
  p.g = p.K / p.G;
  p.w = w.untyped_data();
  p.scale = scale;
  p.x = x.typed_data();
  p.y = y->typed_data();
  if (p.M == 0 || p.N == 0) return false;
  if (p.K == 0) {  // no inputs: y = 0
    std::fill(p.y, p.y + p.M * p.N, 0.0f);
    return false;
  }
  return true;
}

// Checks the shapes, then runs KN or NK; scale_dims is empty for float32 weights.
ffi::Error Run(ffi::ThreadPool& pool, Matrix x, ffi::AnyBuffer w, const float* scale,
               ffi::Span<const int64_t> scale_dims, int bits, bool transposed, ResultMatrix y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("streaming matmul: the weight must be 2-D");
  Problem p;
  p.bits = bits;
  p.M = xd[0];
  p.K = xd[1];
  const int64_t packing = bits == 4 ? 2 : 1;
  p.N = transposed ? wd[0] : wd[1] * packing;
  const int64_t stored_k = transposed ? wd[1] * packing : wd[0];
  if (stored_k != p.K) return ffi::Error::InvalidArgument("streaming matmul: x [M, K] and the weight do not agree");
  if (scale != nullptr) {
    p.G = transposed ? scale_dims[1] : scale_dims[0];
    if (p.G < 1 || p.K % p.G || (transposed ? scale_dims[0] : scale_dims[1]) != p.N)
      return ffi::Error::InvalidArgument("streaming matmul: the weight and scale shapes do not agree");
  } else {
    p.G = 1;
  }
  if (!bind(p, x, w, scale, y)) return ffi::Error::Success();
  switch (bits * (transposed ? -1 : 1)) {
    case 32: kn<32>(pool, p); break;
    case 8: kn<8>(pool, p); break;
    case 4: kn<4>(pool, p); break;
    case -32: nk<32>(pool, p); break;
    case -8: nk<8>(pool, p); break;
    case -4: nk<4>(pool, p); break;
  }
  return ffi::Error::Success();
}

// Whether w's element type is the one of `bits`: float32 (32), int8 (8), uint8 with two int4 values (4).
bool stores(ffi::AnyBuffer w, int bits) {
  switch (bits) {
    case 32: return w.element_type() == ffi::DataType::F32;
    case 8: return w.element_type() == ffi::DataType::S8;
    case 4: return w.element_type() == ffi::DataType::U8;
    default: return false;
  }
}

ffi::Error FloatMatmul(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer w, int32_t transposed, ResultMatrix y) {
  if (!stores(w, 32)) return ffi::Error::InvalidArgument("streaming matmul: a float weight must be float32");
  return Run(pool, x, w, nullptr, {}, 32, transposed != 0, y);
}

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer q, Matrix scale, int32_t bits,
                           int32_t transposed, ResultMatrix y) {
  if (bits == 32 || !stores(q, bits))
    return ffi::Error::InvalidArgument("streaming matmul: bits must be 8 (int8 weight) or 4 (uint8 packed weight)");
  return Run(pool, x, q, scale.typed_data(), scale.dimensions(), bits, transposed != 0, y);
}

// Checks the shapes of panels [N/T, K, T] (int4: [N/T, K, T/2] bytes) and runs them; scale_dims is
// empty for float32 weights, else [G, N].
ffi::Error RunPanels(ffi::ThreadPool& pool, Matrix x, ffi::AnyBuffer w, const float* scale,
                     ffi::Span<const int64_t> scale_dims, int bits, ResultMatrix y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (wd.size() != 3 || wd[2] * (bits == 4 ? 2 : 1) != T)
    return ffi::Error::InvalidArgument("streaming matmul: panels must be [N/64, K, 64] (int4: [N/64, K, 32] bytes)");
  Problem p;
  p.bits = bits;
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[0] * T;
  if (wd[1] != p.K) return ffi::Error::InvalidArgument("streaming matmul: x [M, K] and the panels do not agree");
  p.G = scale != nullptr ? scale_dims[0] : 1;
  if (scale != nullptr && (p.G < 1 || p.K % p.G || scale_dims[1] != p.N))
    return ffi::Error::InvalidArgument("streaming matmul: the panels and scale shapes do not agree");
  if (!bind(p, x, w, scale, y)) return ffi::Error::Success();
  switch (bits) {
    case 32: panels<32>(pool, p); break;
    case 8: panels<8>(pool, p); break;
    case 4: panels<4>(pool, p); break;
  }
  return ffi::Error::Success();
}

ffi::Error FloatPanelMatmul(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer w, ResultMatrix y) {
  if (!stores(w, 32)) return ffi::Error::InvalidArgument("streaming matmul: float panels must be float32");
  return RunPanels(pool, x, w, nullptr, {}, 32, y);
}

ffi::Error QuantizedPanelMatmul(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer q, Matrix scale, int32_t bits,
                                ResultMatrix y) {
  if (bits == 32 || !stores(q, bits))
    return ffi::Error::InvalidArgument("streaming matmul: bits must be 8 (int8 panels) or 4 (uint8 packed panels)");
  return RunPanels(pool, x, q, scale.typed_data(), scale.dimensions(), bits, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StreamingFloatMatmul, FloatMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()          // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // w: float32
                                  .Attr<int32_t>("transposed")  // 1: the weight is stored [N, K]
                                  .Ret<Matrix>());              // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(StreamingQuantizedMatmul, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()          // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // q: int8, or uint8 with two int4 values
                                  .Arg<Matrix>()          // scale
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("transposed")  // 1: the weight is stored [N, K]
                                  .Ret<Matrix>());              // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(StreamingFloatPanelMatmul, FloatPanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()          // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // panels: float32 [N/64, K, 64]
                                  .Ret<Matrix>());        // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(StreamingQuantizedPanelMatmul, QuantizedPanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()          // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // panels: int8, or uint8 with two int4 values
                                  .Arg<Matrix>()          // scale [G, N]
                                  .Attr<int32_t>("bits")
                                  .Ret<Matrix>());        // y [M, N]
