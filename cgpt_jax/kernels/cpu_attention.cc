// Causal softmax attention for XLA:CPU: forward and backward as XLA FFI handlers.
//
// Why: on CPU, XLA runs attention as separate dots, a softmax and many small copies (per-chunk slices,
// transposes, padded gradient sums); at the CPU ladder's shapes (head dim 16, 128 positions) the
// copies cost more than the arithmetic. Here each (batch, head) pair is one task that keeps its keys
// and values in cache and walks the queries R = 8 rows at a time, computing only the causal triangle.
//
// Layouts (float32, row-major): q, k, v, o, dq, dk, dv [B, L, H, K]; stats [B, H, L, 2], each query's
// largest scaled logit and the reciprocal of its softmax denominator, saved by the forward pass so the
// backward pass recomputes exactly the forward probabilities without a second softmax (FlashAttention
// keeps the log-sum-exp instead, which rounds to the precision of the largest logit).
//
// A third handler attends a few new queries (a decode step) over a key/value cache: XLA computes the
// scores of every slot of the cache's bucket, for padding rows as well, one thread at a time; here each
// (sequence, head) pair reads only the keys and values up to its query's position, on all threads.
// Layouts: q, o [B, T, H, K]; the caches k, v head-major [B, G, S, K] (G key/value heads, query head h
// reading head h / (H / G)); positions [B, T] int32, the cache slot s holding position s.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace cgpt;

constexpr int R = 8;  // query rows per block: each key/value load serves R rows

inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; ++i) m = std::max(m, v[i]); return m; }

// Lanes of the key block starting at key j0 that query i sees (key <= query).
inline vi visible(int64_t j0, int64_t i) {
  vi lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  return (lane + (int32_t)j0) <= (int32_t)i;
}

// e^x: x = n·ln2 + r with |r| <= ln2/2; e^r from its Taylor series to r^7 (truncation error below 6e-9
// relative), times 2^n written into the exponent bits. x is clamped to [-87, 88], the normal range.
inline vf exp_v(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const vf shifter = splat(12582912.0f);  // 1.5·2^23: adding it rounds to the nearest integer
  const vf n = (x * splat(1.44269504088896341f) + shifter) - shifter;
  const vf r = x - n * splat(0.693145751953125f) - n * splat(1.42860682030941723e-6f);  // ln2 in two parts
  vf p = splat(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + splat(c);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// One query's scores s[0..n_vec) (whole vectors) → e^(s - max) over the keys it sees (key <= last), 0 past
// them; returns the max and sets inverse_sum to 1 / the sum.
inline float unnormalized_softmax(float* s, int64_t n_vec, int64_t last, float& inverse_sum) {
  vf max_v = splat(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n_vec; j0 += W) {
    const vf x = load(s + j0);
    max_v = visible(j0, last) && x > max_v ? x : max_v;
  }
  const float max = hmax(max_v);
  vf sum_v = {};
  for (int64_t j0 = 0; j0 < n_vec; j0 += W) {
    const vf p = visible(j0, last) ? exp_v(load(s + j0) - splat(max)) : splat(0.0f);
    sum_v += p;
    store(s + j0, p);
  }
  inverse_sum = 1.0f / hsum(sum_v);
  return max;
}

struct Dims {
  int64_t B, L, H, K;
  int64_t Lp, Kp;  // L and K rounded up to whole vectors

  Dims(int64_t b, int64_t l, int64_t h, int64_t k) : B(b), L(l), H(h), K(k), Lp(round_up(l)), Kp(round_up(k)) {}
  int64_t row(int64_t b, int64_t i, int64_t h) const { return ((b * L + i) * H + h) * K; }  // q[b, i, h, :]
};

// One (batch, head) pair's working set, in thread-local memory that grows on demand.
struct Workspace {
  float *Kt, *Vt;          // [K, Lp]: keys / values along a row, zero-padded (scores, dL/dp)
  float *Kr, *Vr;          // [L, Kp]: one key / value per row, zero-padded (weighted sums)
  float *dK, *dV;          // [L, Kp]: gradient accumulators
  float *s, *dp;           // [R, Lp]: the block's scores → probabilities, dL/dp → dL/ds
  float *qs, *dos, *out;   // [R, Kp]: scale·q, dL/do and an output block

  explicit Workspace(const Dims& d) {
    thread_local std::vector<float> memory;
    const int64_t sizes[] = {d.K * d.Lp, d.K * d.Lp, d.L * d.Kp, d.L * d.Kp, d.L * d.Kp, d.L * d.Kp,
                             R * d.Lp,   R * d.Lp,   R * d.Kp,   R * d.Kp,   R * d.Kp};
    int64_t total = 0;
    for (int64_t size : sizes) total += size;
    if ((int64_t)memory.size() < total) memory.resize(total);
    std::fill(memory.begin(), memory.begin() + total, 0.0f);
    float** parts[] = {&Kt, &Vt, &Kr, &Vr, &dK, &dV, &s, &dp, &qs, &dos, &out};
    float* at = memory.data();
    for (int p = 0; p < 11; ++p) { *parts[p] = at; at += sizes[p]; }
  }

  // Vt is only read by the backward pass (dL/dp = dO·Vᵀ).
  void load_keys_values(const Dims& d, const float* k, const float* v, int64_t b, int64_t h, bool with_vt) {
    for (int64_t j = 0; j < d.L; ++j) {
      std::memcpy(Kr + j * d.Kp, k + d.row(b, j, h), d.K * sizeof(float));
      std::memcpy(Vr + j * d.Kp, v + d.row(b, j, h), d.K * sizeof(float));
    }
    for (int64_t c = 0; c < d.K; ++c)
      for (int64_t j = 0; j < d.L; ++j) Kt[c * d.Lp + j] = Kr[j * d.Kp + c];
    if (with_vt)
      for (int64_t c = 0; c < d.K; ++c)
        for (int64_t j = 0; j < d.L; ++j) Vt[c * d.Lp + j] = Vr[j * d.Kp + c];
  }
};

// out[r][j] = Σ_c a[r][c]·Bt[c][j] for the R rows of a ([R, Kp]) and keys j < n (whole vectors).
inline void rows_times_transposed(const Dims& d, const float* a, const float* Bt, int64_t n, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    vf acc[R] = {};
    for (int64_t c = 0; c < d.K; ++c) {
      const vf bt = load(Bt + c * d.Lp + j0);
      for (int r = 0; r < R; ++r) acc[r] += splat(a[r * d.Kp + c]) * bt;
    }
    for (int r = 0; r < R; ++r) store(out + r * d.Lp + j0, acc[r]);
  }
}

// out[r] = Σ_{j<n} w[r][j]·B[j] for weights w [R, Lp] and rows B [L, Kp].
inline void weighted_rows(const Dims& d, const float* w, const float* B, int64_t n, float* out) {
  for (int64_t c0 = 0; c0 < d.Kp; c0 += W) {
    vf acc[R] = {};
    for (int64_t j = 0; j < n; ++j) {
      const vf b = load(B + j * d.Kp + c0);
      for (int r = 0; r < R; ++r) acc[r] += splat(w[r * d.Lp + j]) * b;
    }
    for (int r = 0; r < R; ++r) store(out + r * d.Kp + c0, acc[r]);
  }
}

// acc[j] += Σ_r w[r][j]·x[r] for j < n: a transposed product into an [L, Kp] accumulator. Four keys at
// a time: each key's sum over r is a chain of dependent additions, and four chains keep the FMA units busy.
inline void accumulate_transposed(const Dims& d, const float* w, const float* x, int64_t n, float* acc) {
  constexpr int J = 4;
  for (int64_t c0 = 0; c0 < d.Kp; c0 += W) {
    vf xr[R];
    for (int r = 0; r < R; ++r) xr[r] = load(x + r * d.Kp + c0);
    int64_t j = 0;
    for (; j + J <= n; j += J) {
      vf sum[J];
      for (int u = 0; u < J; ++u) sum[u] = load(acc + (j + u) * d.Kp + c0);
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < J; ++u) sum[u] += splat(w[r * d.Lp + j + u]) * xr[r];
      for (int u = 0; u < J; ++u) store(acc + (j + u) * d.Kp + c0, sum[u]);
    }
    for (; j < n; ++j) {
      vf sum = load(acc + j * d.Kp + c0);
      for (int r = 0; r < R; ++r) sum += splat(w[r * d.Lp + j]) * xr[r];
      store(acc + j * d.Kp + c0, sum);
    }
  }
}

// Copies rows i0..i0+rows-1 of head h of x into block ([R, Kp], rows past `rows` zero), times `scale`.
inline void load_rows(const Dims& d, const float* x, int64_t b, int64_t h, int64_t i0, int rows, float scale,
                      float* block) {
  std::fill(block, block + R * d.Kp, 0.0f);
  for (int r = 0; r < rows; ++r) {
    const float* src = x + d.row(b, i0 + r, h);
    float* dst = block + r * d.Kp;
    for (int64_t c = 0; c < d.K; ++c) dst[c] = src[c] * scale;
  }
}

void forward_pair(const Dims& d, const float* q, const float* k, const float* v, float scale, int64_t pair,
                  float* o, float* stats) {
  const int64_t b = pair / d.H, h = pair % d.H;
  Workspace ws(d);
  ws.load_keys_values(d, k, v, b, h, false);
  for (int64_t i0 = 0; i0 < d.L; i0 += R) {
    const int rows = (int)std::min<int64_t>(R, d.L - i0);
    const int64_t n = i0 + rows, n_vec = round_up(n);  // keys 0..n-1 are visible to some row
    load_rows(d, q, b, h, i0, rows, scale, ws.qs);
    rows_times_transposed(d, ws.qs, ws.Kt, n_vec, ws.s);
    float inverse_sum[R];  // 1 / the softmax denominator of each row
    for (int r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const float max = unnormalized_softmax(ws.s + r * d.Lp, n_vec, i, inverse_sum[r]);
      stats[2 * (pair * d.L + i)] = max;
      stats[2 * (pair * d.L + i) + 1] = inverse_sum[r];
    }
    for (int r = rows; r < R; ++r) std::fill(ws.s + r * d.Lp, ws.s + (r + 1) * d.Lp, 0.0f);
    weighted_rows(d, ws.s, ws.Vr, n, ws.out);  // unnormalized: each row is scaled once below
    for (int r = 0; r < rows; ++r) {
      float* dst = o + d.row(b, i0 + r, h);
      for (int64_t c = 0; c < d.K; ++c) dst[c] = ws.out[r * d.Kp + c] * inverse_sum[r];
    }
  }
}

void backward_pair(const Dims& d, const float* q, const float* k, const float* v, const float* o,
                   const float* stats, const float* dout, float scale, int64_t pair, float* dq, float* dk, float* dv) {
  const int64_t b = pair / d.H, h = pair % d.H;
  Workspace ws(d);
  ws.load_keys_values(d, k, v, b, h, true);
  for (int64_t i0 = 0; i0 < d.L; i0 += R) {
    const int rows = (int)std::min<int64_t>(R, d.L - i0);
    const int64_t n = i0 + rows, n_vec = round_up(n);
    load_rows(d, q, b, h, i0, rows, scale, ws.qs);
    load_rows(d, dout, b, h, i0, rows, 1.0f, ws.dos);
    rows_times_transposed(d, ws.qs, ws.Kt, n_vec, ws.s);    // scores
    rows_times_transposed(d, ws.dos, ws.Vt, n_vec, ws.dp);  // dL/dp = dO·Vᵀ
    for (int r = 0; r < R; ++r) {
      float* s = ws.s + r * d.Lp;
      float* dp = ws.dp + r * d.Lp;
      if (r >= rows) {  // a short last block: its missing rows contribute nothing
        std::fill(s, s + d.Lp, 0.0f);
        std::fill(dp, dp + d.Lp, 0.0f);
        continue;
      }
      const int64_t i = i0 + r;
      const float max = stats[2 * (pair * d.L + i)];
      const vf inverse_sum = splat(stats[2 * (pair * d.L + i) + 1]);
      vf delta_v = {};  // Σ_j p·dL/dp, the softmax backward's row term
      for (int64_t j0 = 0; j0 < n_vec; j0 += W) {
        const vf p = visible(j0, i) ? exp_v(load(s + j0) - splat(max)) * inverse_sum : splat(0.0f);
        store(s + j0, p);
        delta_v += p * load(dp + j0);
      }
      const vf delta = splat(hsum(delta_v));
      for (int64_t j0 = 0; j0 < n_vec; j0 += W) store(dp + j0, load(s + j0) * (load(dp + j0) - delta));  // dL/ds
    }
    accumulate_transposed(d, ws.s, ws.dos, n, ws.dV);  // dV += Pᵀ·dO
    accumulate_transposed(d, ws.dp, ws.qs, n, ws.dK);  // dK += dSᵀ·(scale·Q)
    weighted_rows(d, ws.dp, ws.Kr, n, ws.out);         // dQ = scale·dS·K
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d.K; ++c) dq[d.row(b, i0 + r, h) + c] = ws.out[r * d.Kp + c] * scale;
  }
  for (int64_t j = 0; j < d.L; ++j) {
    std::memcpy(dk + d.row(b, j, h), ws.dK + j * d.Kp, d.K * sizeof(float));
    std::memcpy(dv + d.row(b, j, h), ws.dV + j * d.Kp, d.K * sizeof(float));
  }
}

using Array4 = ffi::Buffer<ffi::F32, 4>;  // aliases: the handler macros below split a comma in a template
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error check_shapes(std::initializer_list<ffi::Span<const int64_t>> shapes) {
  for (auto shape : shapes)
    if (!std::equal(shape.begin(), shape.end(), shapes.begin()->begin(), shapes.begin()->end()))
      return ffi::Error::InvalidArgument("causal attention: q, k, v (and o, do) must have one shape [B, L, H, K]");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, Array4 q, Array4 k, Array4 v, float scale, Result4 o, Result4 stats) {
  if (ffi::Error error = check_shapes({q.dimensions(), k.dimensions(), v.dimensions()}); error.failure()) return error;
  const auto shape = q.dimensions();
  const Dims d(shape[0], shape[1], shape[2], shape[3]);
  parallel_for(pool, d.B * d.H, [&](int64_t pair) {
    forward_pair(d, q.typed_data(), k.typed_data(), v.typed_data(), scale, pair, o->typed_data(), stats->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, Array4 q, Array4 k, Array4 v, Array4 o, Array4 stats,
                    Array4 dout, float scale, Result4 dq, Result4 dk, Result4 dv) {
  if (ffi::Error error = check_shapes({q.dimensions(), k.dimensions(), v.dimensions(), o.dimensions(),
                                       dout.dimensions()});
      error.failure())
    return error;
  const auto shape = q.dimensions();
  const Dims d(shape[0], shape[1], shape[2], shape[3]);
  parallel_for(pool, d.B * d.H, [&](int64_t pair) {
    backward_pair(d, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), stats.typed_data(),
                  dout.typed_data(), scale, pair, dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

// --- Queries over a cache ---

struct CacheDims {
  int64_t B, T, H, G, S, K;
};

// o[b, t, h] = softmax(scale · q[b, t, h] · k[b, g, :n]ᵀ) · v[b, g, :n] for each query t of pair (b, h),
// n = its position + 1 (the keys it sees), g = h / (H / G). Scores live in `scores` ([round_up(S)]).
void cached_pair(const CacheDims& d, const float* q, const float* k, const float* v, const int32_t* positions,
                 float scale, int64_t pair, float* scores, float* o) {
  const int64_t b = pair / d.H, h = pair % d.H, g = h / (d.H / d.G);
  const float* keys = k + (b * d.G + g) * d.S * d.K;
  const float* values = v + (b * d.G + g) * d.S * d.K;
  const int64_t vectors_end = d.K / W * W;
  for (int64_t t = 0; t < d.T; ++t) {
    const float* query = q + ((b * d.T + t) * d.H + h) * d.K;
    float* out = o + ((b * d.T + t) * d.H + h) * d.K;
    const int64_t n = std::clamp<int64_t>(int64_t{positions[b * d.T + t]} + 1, 0, d.S);
    if (n == 0) {  // a position before the cache: no key to see
      std::fill(out, out + d.K, 0.0f);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* key = keys + j * d.K;
      vf sum_v = {};
      for (int64_t c = 0; c < vectors_end; c += W) sum_v += load(query + c) * load(key + c);
      float sum = hsum(sum_v);
      for (int64_t c = vectors_end; c < d.K; ++c) sum += query[c] * key[c];
      scores[j] = scale * sum;
    }
    float inverse_sum;
    unnormalized_softmax(scores, round_up(n), n - 1, inverse_sum);
    std::fill(out, out + d.K, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* value = values + j * d.K;
      const vf p = splat(scores[j]);
      for (int64_t c = 0; c < vectors_end; c += W) store(out + c, load(out + c) + p * load(value + c));
      for (int64_t c = vectors_end; c < d.K; ++c) out[c] += scores[j] * value[c];
    }
    for (int64_t c = 0; c < d.K; ++c) out[c] *= inverse_sum;
  }
}

using Positions = ffi::Buffer<ffi::S32, 2>;

ffi::Error Cached(ffi::ThreadPool pool, Array4 q, Array4 k, Array4 v, Positions positions,
                  float scale, Result4 o) {
  const auto qd = q.dimensions(), kd = k.dimensions(), pd = positions.dimensions();
  const CacheDims d{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3]};
  if (!std::equal(kd.begin(), kd.end(), v.dimensions().begin(), v.dimensions().end()) || kd[0] != d.B ||
      kd[3] != d.K || d.G < 1 || d.H % d.G != 0 || pd[0] != d.B || pd[1] != d.T)
    return ffi::Error::InvalidArgument("cached attention: expected q [B, T, H, K], caches k and v [B, G, S, K] "
                                       "with H a multiple of G, and positions [B, T]");
  parallel_for(pool, d.B * d.H, [&](int64_t pair) {
    thread_local std::vector<float> scores;
    if ((int64_t)scores.size() < round_up(d.S)) scores.resize(round_up(d.S));
    cached_pair(d, q.typed_data(), k.typed_data(), v.typed_data(), positions.typed_data(), scale, pair,
                scores.data(), o->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array4>()  // q
                                  .Arg<Array4>()  // k
                                  .Arg<Array4>()  // v
                                  .Attr<float>("scale")
                                  .Ret<Array4>()    // o
                                  .Ret<Array4>());  // stats

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array4>()                    // q
                                  .Arg<Array4>()                    // k
                                  .Arg<Array4>()                    // v
                                  .Arg<Array4>()                    // o
                                  .Arg<Array4>()                    // stats
                                  .Arg<Array4>()                    // dL/do
                                  .Attr<float>("scale")
                                  .Ret<Array4>()    // dq
                                  .Ret<Array4>()    // dk
                                  .Ret<Array4>());  // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(CachedAttention, Cached,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array4>()                    // q [B, T, H, K]
                                  .Arg<Array4>()                    // k cache [B, G, S, K]
                                  .Arg<Array4>()                    // v cache [B, G, S, K]
                                  .Arg<Positions>()                 // positions [B, T]
                                  .Attr<float>("scale")
                                  .Ret<Array4>());  // o [B, T, H, K]
