// y = x · dequantize(W) for a weight-only quantized W, as an XLA FFI handler for XLA:CPU.
//
// Why: XLA:CPU does not fuse the dequantization into a matmul of more than one row; it writes the float32
// weight out and reads it back for its GEMM, so a decode step reads more bytes than in float32. Here each
// tile of the weight is read once as integers, dequantized into a small float buffer that stays in
// cache, and every row of x runs over it: the weight crosses the memory bus as int8 or int4.
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

// W[k, n] dequantized, one element at a time (tails of strips and rows).
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

// KN: dequantizes columns n0..n0+T-1 of W into tile [K, T] (zero past N), then y[:, n0..] = x · tile.
void kn_strip(const Problem& p, const float* x, int64_t n0, float* y) {
  thread_local std::vector<float> memory;
  if ((int64_t)memory.size() < p.K * T) memory.resize(p.K * T);
  float* tile = memory.data();
  const int64_t width = std::min(T, p.N - n0);
  if (width == T) {
    for (int64_t k = 0; k < p.K; ++k) {
      const float* s = p.scale + (k / p.g) * p.N + n0;
      vf w0, w1;
      if (p.bits == 8) {
        const int8_t* row = static_cast<const int8_t*>(p.q) + k * p.N + n0;
        w0 = int8_to_float(row);
        w1 = int8_to_float(row + W);
      } else {
        int4_to_float(static_cast<const int8_t*>(p.q) + (k * p.N + n0) / 2, w0, w1);
      }
      store(tile + k * T, w0 * load(s));
      store(tile + k * T + W, w1 * load(s + W));
    }
  } else {
    for (int64_t k = 0; k < p.K; ++k)
      for (int64_t c = 0; c < T; ++c) tile[k * T + c] = c < width ? dequantize_one(p, k, n0 + c) : 0.0f;
  }
  for (int64_t r0 = 0; r0 < p.M; r0 += RKN) {  // x has whole blocks of rows (zero-padded)
    vf acc[RKN][2] = {};
    for (int64_t k = 0; k < p.K; ++k) {
      const vf w0 = load(tile + k * T), w1 = load(tile + k * T + W);
      for (int r = 0; r < RKN; ++r) {
        const vf xr = splat(x[(r0 + r) * p.K + k]);
        acc[r][0] += xr * w0;
        acc[r][1] += xr * w1;
      }
    }
    for (int r = 0; r < RKN && r0 + r < p.M; ++r) {
      float* out = y + (r0 + r) * p.N + n0;
      if (width == T) {
        store(out, acc[r][0]);
        store(out + W, acc[r][1]);
      } else {
        for (int64_t c = 0; c < width; ++c) out[c] = acc[r][c / W][c % W];
      }
    }
  }
}

// The scale vector for inputs k0, k0+1, ..., k0+W-1 of stored row `scale_row` (NK layout).
inline vf scales_along_k(const Problem& p, const float* scale_row, int64_t k0) {
  if (k0 / p.g == (k0 + W - 1) / p.g) return splat(scale_row[k0 / p.g]);
  vf s;
  for (int l = 0; l < W; ++l) s[l] = scale_row[(k0 + l) / p.g];
  return s;
}

// NK: row n of the stored weight dequantized into row [Kp] (zero past K).
void nk_dequantize_row(const Problem& p, int64_t n, int64_t Kp, float* row) {
  const float* scale_row = p.scale + n * p.G;
  int64_t k = 0;
  if (p.bits == 8) {
    const int8_t* q = static_cast<const int8_t*>(p.q) + n * p.K;
    for (; k + W <= p.K; k += W) store(row + k, int8_to_float(q + k) * scales_along_k(p, scale_row, k));
  } else {
    const int8_t* q = static_cast<const int8_t*>(p.q) + n * p.K / 2;
    for (; k + 2 * W <= p.K; k += 2 * W) {
      vf w0, w1;
      int4_to_float(q + k / 2, w0, w1);
      store(row + k, w0 * scales_along_k(p, scale_row, k));
      store(row + k + W, w1 * scales_along_k(p, scale_row, k + W));
    }
  }
  for (; k < p.K; ++k) row[k] = dequantize_one(p, k, n);
  std::fill(row + p.K, row + Kp, 0.0f);
}

// NK: y[:, n0..n0+C-1] = x · (stored rows n0..n0+C-1)ᵀ; x is [M rounded up to RNK, Kp], zero-padded.
void nk_block(const Problem& p, const float* x, int64_t Kp, int64_t n0, float* y) {
  thread_local std::vector<float> memory;
  if ((int64_t)memory.size() < C * Kp) memory.resize(C * Kp);
  float* rows = memory.data();
  const int64_t count = std::min<int64_t>(C, p.N - n0);
  for (int64_t c = 0; c < C; ++c) {
    if (c < count) nk_dequantize_row(p, n0 + c, Kp, rows + c * Kp);
    else std::fill(rows + c * Kp, rows + (c + 1) * Kp, 0.0f);
  }
  for (int64_t r0 = 0; r0 < p.M; r0 += RNK) {
    vf acc[RNK][C] = {};
    for (int64_t k = 0; k < Kp; k += W) {
      vf w[C];
      for (int c = 0; c < C; ++c) w[c] = load(rows + c * Kp + k);
      for (int r = 0; r < RNK; ++r) {
        const vf xr = load(x + (r0 + r) * Kp + k);
        for (int c = 0; c < C; ++c) acc[r][c] += xr * w[c];
      }
    }
    for (int r = 0; r < RNK && r0 + r < p.M; ++r)
      for (int64_t c = 0; c < count; ++c) y[(r0 + r) * p.N + n0 + c] = hsum(acc[r][c]);
  }
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
  // x with whole blocks of rows (and, for NK, whole vectors along K), zero-padded.
  const int64_t rows = p.nk ? RNK : RKN, Mp = (p.M + rows - 1) / rows * rows;
  const int64_t Kp = p.nk ? round_up(p.K) : p.K;
  std::vector<float> xp(Mp * Kp, 0.0f);
  for (int64_t m = 0; m < p.M; ++m) std::memcpy(xp.data() + m * Kp, x.typed_data() + m * p.K, p.K * sizeof(float));
  if (p.nk) {
    parallel_for(pool, (p.N + C - 1) / C, [&](int64_t block) { nk_block(p, xp.data(), Kp, block * C, out); });
  } else {
    parallel_for(pool, (p.N + T - 1) / T, [&](int64_t strip) { kn_strip(p, xp.data(), strip * T, out); });
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
