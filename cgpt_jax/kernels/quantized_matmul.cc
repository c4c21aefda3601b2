// y = x · dequantize(W) for a weight-only quantized W, as an XLA FFI handler for XLA:CPU.
//
// Why: XLA:CPU does not fuse the dequantization into a matmul of more than one row; it writes the float32
// weight out and reads it back for its GEMM, so a decode step reads more bytes than in float32. Here the
// weight is read once as integers and each piece of it is dequantized once and used by every row of x:
// KN in registers, strip by strip of T columns, for RKN rows at a time (a strip is re-read from cache for
// more rows); NK row by row into a buffer in cache, C rows at a time, each x row a dot product with them.
//
// Layouts (row-major): x [M, K] float32, y [M, N] float32. The weight is either
//   KN (a projection, W [K, N]): q [K, N] int8 or [K, N/2] uint8, scale [G, N];
//   NK (the tied LM head, W stored as [N, K] and used transposed): q [N, K] or [N, K/2], scale [N, G];
// 4-bit values are packed two per byte along the stored last axis, the low nibble first, two's
// complement; K splits into G groups of g = K/G consecutive inputs, each with its own scale per output.
// Dequantized weights are q·scale in float32 and the products are summed in float32, as XLA's path does.
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace cgpt;

typedef int8_t vb __attribute__((vector_size(W)));

constexpr int64_t T = 2 * W;  // KN: output columns per strip, two vectors
constexpr int RKN = 8;        // KN: rows of x per block, 2·RKN accumulators
constexpr int C = 4;          // NK: weight rows (output columns) per block
constexpr int RNK = 4;        // NK: rows of x per block, RNK·C accumulators

struct Problem {
  int64_t M, K, N, G, g;
  int bits;
  bool nk;
  const void* q;
  const float* scale;
};

// W[k, n] dequantized, one element at a time (the last strip, rows' tails, groups shorter than a vector).
inline float dequantize_one(const Problem& p, int64_t k, int64_t n) {
  const int64_t index = p.nk ? n * p.K + k : k * p.N + n;  // in the unpacked stored weight
  int value;
  if (p.bits == 8) {
    value = static_cast<const int8_t*>(p.q)[index];
  } else {
    const int8_t byte = static_cast<const int8_t*>(p.q)[index / 2];
    value = index % 2 ? byte >> 4 : static_cast<int8_t>(byte << 4) >> 4;
  }
  const float s = p.nk ? p.scale[n * p.G + k / p.g] : p.scale[(k / p.g) * p.N + n];
  return value * s;
}

inline vf int8_to_float(const void* bytes) {
  vb b;
  std::memcpy(&b, bytes, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, vi), vf);
}

// 16 packed bytes → the 32 values they hold, in order: (values 0..15, values 16..31).
inline void int4_to_float(const void* bytes, vf& first, vf& second) {
  vb b;
  std::memcpy(&b, bytes, sizeof b);
  const vi v = __builtin_convertvector(b, vi);
  const vf low = __builtin_convertvector((v << 28) >> 28, vf), high = __builtin_convertvector(v >> 4, vf);
  first = __builtin_shufflevector(low, high, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  second = __builtin_shufflevector(low, high, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
}

// KN: W[k, n0..n0+T-1] as two vectors of integers converted to float.
inline void kn_columns(const Problem& p, int64_t k, int64_t n0, vf& w0, vf& w1) {
  const int8_t* q = static_cast<const int8_t*>(p.q);
  if (p.bits == 8) {
    w0 = int8_to_float(q + k * p.N + n0);
    w1 = int8_to_float(q + k * p.N + n0 + W);
  } else {
    int4_to_float(q + (k * p.N + n0) / 2, w0, w1);
  }
}

// KN: y[r0..r0+R-1, n0..n0+T-1] = x[r0.., :] · W[:, n0..]. Each weight row of the strip is converted and
// scaled once, in registers, and serves the R rows of x.
template <int R>
void kn_rows(const Problem& p, const float* x, int64_t r0, int64_t n0, float* y) {
  vf acc[R][2] = {};
  for (int64_t group = 0; group < p.G; ++group) {
    const vf s0 = load(p.scale + group * p.N + n0), s1 = load(p.scale + group * p.N + n0 + W);
    for (int64_t k = group * p.g; k < (group + 1) * p.g; ++k) {
      vf w0, w1;
      kn_columns(p, k, n0, w0, w1);
      w0 *= s0;
      w1 *= s1;
      for (int r = 0; r < R; ++r) {
        const vf xr = splat(x[(r0 + r) * p.K + k]);
        acc[r][0] += xr * w0;
        acc[r][1] += xr * w1;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    store(y + (r0 + r) * p.N + n0, acc[r][0]);
    store(y + (r0 + r) * p.N + n0 + W, acc[r][1]);
  }
}

// By the number of rows left (1..RKN): the accumulators stay in registers for every count.
using KnRows = void (*)(const Problem&, const float*, int64_t, int64_t, float*);
constexpr KnRows KN_ROWS[] = {nullptr, kn_rows<1>, kn_rows<2>, kn_rows<3>, kn_rows<4>,
                              kn_rows<5>, kn_rows<6>, kn_rows<7>, kn_rows<8>};

// KN: columns n0..n0+T-1 of y, or of the last, narrower strip element by element.
void kn_strip(const Problem& p, const float* x, int64_t n0, float* y) {
  if (n0 + T <= p.N) {
    for (int64_t r0 = 0; r0 < p.M; r0 += RKN) KN_ROWS[std::min<int64_t>(RKN, p.M - r0)](p, x, r0, n0, y);
    return;
  }
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = n0; n < p.N; ++n) {
      float sum = 0;
      for (int64_t k = 0; k < p.K; ++k) sum += x[m * p.K + k] * dequantize_one(p, k, n);
      y[m * p.N + n] = sum;
    }
}

// NK: row n of the stored weight dequantized into row [Kp] (zero past K). Where the group size is a whole
// number of vectors, each vector has one scale.
void nk_dequantize_row(const Problem& p, int64_t n, int64_t Kp, float* row) {
  const float* scale_row = p.scale + n * p.G;
  const int8_t* q = static_cast<const int8_t*>(p.q) + n * p.K / (p.bits == 4 ? 2 : 1);
  int64_t k = 0;
  if (p.g % W == 0) {
    int64_t group = 0, group_end = p.g;  // the group of input k, followed without a division per vector
    auto scale_at = [&](int64_t input) {
      for (; input >= group_end; group_end += p.g) ++group;
      return splat(scale_row[group]);
    };
    if (p.bits == 8) {
      for (; k + W <= p.K; k += W) store(row + k, int8_to_float(q + k) * scale_at(k));
    } else {
      for (; k + 2 * W <= p.K; k += 2 * W) {
        vf w0, w1;
        int4_to_float(q + k / 2, w0, w1);
        store(row + k, w0 * scale_at(k));
        store(row + k + W, w1 * scale_at(k + W));
      }
    }
  }
  for (; k < p.K; ++k) row[k] = dequantize_one(p, k, n);
  std::fill(row + p.K, row + Kp, 0.0f);
}

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

// NK: y[r0..r0+R-1, n0..n0+count-1] = x[r0.., :] · rowsᵀ, rows [C, Kp]; x is [M, Kp], zero-padded.
template <int R>
void nk_rows(const Problem& p, const float* rows, const float* x, int64_t Kp, int64_t r0, int64_t n0, int64_t count,
             float* y) {
  vf acc[R][C] = {};
  for (int64_t k = 0; k < Kp; k += W) {
    vf w[C];
    for (int c = 0; c < C; ++c) w[c] = load(rows + c * Kp + k);
    for (int r = 0; r < R; ++r) {
      const vf xr = load(x + (r0 + r) * Kp + k);
      for (int c = 0; c < C; ++c) acc[r][c] += xr * w[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    const vf sums = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    for (int64_t c = 0; c < count; ++c) y[(r0 + r) * p.N + n0 + c] = sums[4 * c];
  }
}

using NkRows = void (*)(const Problem&, const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*);
constexpr NkRows NK_ROWS[] = {nullptr, nk_rows<1>, nk_rows<2>, nk_rows<3>, nk_rows<4>};

// NK, where K and the group size are whole numbers of `nk_step` inputs: y[0..R-1, n0..n0+C-1] = x ·
// (stored rows n0..n0+C-1)ᵀ for all R <= RNK rows of x, the weights converted and scaled in registers.
inline int64_t nk_step(const Problem& p) { return p.bits == 8 ? W : 2 * W; }

template <int R>
void nk_rows_in_registers(const Problem& p, const float* x, int64_t n0, float* y) {
  const int8_t* q = static_cast<const int8_t*>(p.q);
  vf acc[R][C] = {};
  for (int64_t group = 0; group < p.G; ++group) {
    vf s[C];
    for (int c = 0; c < C; ++c) s[c] = splat(p.scale[(n0 + c) * p.G + group]);
    for (int64_t k = group * p.g; k < (group + 1) * p.g; k += nk_step(p)) {
      if (p.bits == 8) {
        vf xr[R];
        for (int r = 0; r < R; ++r) xr[r] = load(x + r * p.K + k);
        for (int c = 0; c < C; ++c) {
          const vf w = int8_to_float(q + (n0 + c) * p.K + k) * s[c];
          for (int r = 0; r < R; ++r) acc[r][c] += xr[r] * w;
        }
      } else {
        vf xr[R][2];
        for (int r = 0; r < R; ++r) xr[r][0] = load(x + r * p.K + k), xr[r][1] = load(x + r * p.K + k + W);
        for (int c = 0; c < C; ++c) {
          vf w0, w1;
          int4_to_float(q + ((n0 + c) * p.K + k) / 2, w0, w1);
          w0 *= s[c];
          w1 *= s[c];
          for (int r = 0; r < R; ++r) acc[r][c] += xr[r][0] * w0 + xr[r][1] * w1;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const vf sums = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    for (int c = 0; c < C; ++c) y[r * p.N + n0 + c] = sums[4 * c];
  }
}

using NkRowsInRegisters = void (*)(const Problem&, const float*, int64_t, float*);
constexpr NkRowsInRegisters NK_ROWS_IN_REGISTERS[] = {nullptr, nk_rows_in_registers<1>, nk_rows_in_registers<2>,
                                                      nk_rows_in_registers<3>, nk_rows_in_registers<4>};

// NK: y[:, n0..n0+C-1] = x · (stored rows n0..n0+C-1)ᵀ; x is [M, Kp], zero-padded along K. Up to RNK rows
// of x against a whole block of aligned weight rows run in registers; otherwise (more rows would convert
// each weight again per block of rows) the weight rows are dequantized into a buffer first.
void nk_block(const Problem& p, const float* x, int64_t Kp, int64_t n0, float* y) {
  thread_local std::vector<float> memory;
  if ((int64_t)memory.size() < C * Kp) memory.resize(C * Kp);
  float* rows = memory.data();
  const int64_t count = std::min<int64_t>(C, p.N - n0);
  if (p.M <= RNK && count == C && p.K % nk_step(p) == 0 && p.g % nk_step(p) == 0) {  // then Kp = K
    NK_ROWS_IN_REGISTERS[p.M](p, x, n0, y);
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    if (c < count) nk_dequantize_row(p, n0 + c, Kp, rows + c * Kp);
    else std::fill(rows + c * Kp, rows + (c + 1) * Kp, 0.0f);
  }
  for (int64_t r0 = 0; r0 < p.M; r0 += RNK) NK_ROWS[std::min<int64_t>(RNK, p.M - r0)](p, rows, x, Kp, r0, n0, count, y);
}

using Matrix = ffi::Buffer<ffi::F32, 2>;  // aliases: the handler macros below split a comma in a template
using ResultMatrix = ffi::ResultBuffer<ffi::F32, 2>;

ffi::Error Matmul(ffi::ThreadPool pool, Matrix x, ffi::AnyBuffer q, Matrix scale, int32_t bits, int32_t transposed,
                  ResultMatrix y) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (qd.size() != 2) return ffi::Error::InvalidArgument("quantized matmul: the weight must be 2-D");
  Problem p;
  p.bits = bits;
  p.nk = transposed != 0;
  p.M = xd[0];
  p.K = xd[1];
  const int64_t packing = bits == 4 ? 2 : 1;
  p.N = p.nk ? qd[0] : qd[1] * packing;
  p.G = p.nk ? sd[1] : sd[0];
  const int64_t stored_k = p.nk ? qd[1] * packing : qd[0];
  const ffi::DataType expected = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  if ((bits != 4 && bits != 8) || q.element_type() != expected)
    return ffi::Error::InvalidArgument("quantized matmul: bits must be 8 (int8 weight) or 4 (uint8 packed weight)");
  if (stored_k != p.K || p.G < 1 || p.K % p.G || (p.nk ? sd[0] : sd[1]) != p.N)
    return ffi::Error::InvalidArgument("quantized matmul: x [M, K], weight and scale shapes do not agree");
  p.g = p.K / p.G;
  p.q = q.untyped_data();
  p.scale = scale.typed_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  float* out = y->typed_data();
  if (p.K == 0) {
    std::fill(out, out + p.M * p.N, 0.0f);
    return ffi::Error::Success();
  }
  if (p.nk) {  // x with whole vectors along K, zero-padded
    const int64_t Kp = round_up(p.K);
    std::vector<float> xp(p.M * Kp, 0.0f);
    for (int64_t m = 0; m < p.M; ++m) std::memcpy(xp.data() + m * Kp, x.typed_data() + m * p.K, p.K * sizeof(float));
    parallel_for(pool, (p.N + C - 1) / C, [&](int64_t block) { nk_block(p, xp.data(), Kp, block * C, out); });
  } else {
    parallel_for(pool, (p.N + T - 1) / T, [&](int64_t strip) { kn_strip(p, x.typed_data(), strip * T, out); });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantizedMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()          // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // q: int8, or uint8 with two int4 values
                                  .Arg<Matrix>()          // scale
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("transposed")  // 1: the weight is stored [N, K]
                                  .Ret<Matrix>());              // y [M, N]
