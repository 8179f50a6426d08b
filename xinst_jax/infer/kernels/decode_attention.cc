// Decode attention over a KV cache on CPU, as an XLA FFI custom call (see ../native_kernels.py).
//
// One new token per row: row b's query heads attend to its cache slots [first[b], last] and
// nothing else, so left padding and the unwritten tail cost nothing (XLA's dots run over every
// slot and mask). The math mirrors decode_model._attention: with a bfloat16 cache the query and the
// probabilities are rounded to bfloat16 before their dots, products accumulate in float32, and the
// softmax is float32. (row, kv head) pairs are shared out over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t bf16_bits) {
  const uint32_t u = uint32_t(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to the nearest bfloat16, ties to even (XLA's float32 -> bfloat16 convert on finite values).
inline float round_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for x <= 0 (softmax scores minus their max) in a form the compiler vectorises:
// Cody-Waite reduction by ln 2 and the Cephes polynomial, within about 1 ulp of expf. Inputs
// below -87 give exp(-87) ~ 1.6e-38 (its weight in a softmax whose max term is 1 is nil).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float magic = 12582912.f;  // 1.5 * 2^23: the sum's low mantissa bits hold round(x / ln 2)
  const float t = x * 1.44269504088896341f + magic;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, 4);
  const float n = t - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale_bits = uint32_t(t_bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

struct Scratch {
  std::vector<float> q, row, acc, probs;
  Scratch(int g, int d, int slots) : q(g * d), row(d), acc(g * d), probs(size_t(g) * slots) {}
};

// One (row, kv head): q [g, d] float32; k, v [slots, d]; out [g, d]; attends to slots [lo, hi].
// D, G > 0: the head dim and group known at compile time (the loops unroll, rows and accumulators
// stay in registers); 0: taken at run time.
template <typename T, int D, int G>
void attend_one(const float* q, const T* k, const T* v, float* out, int g_runtime, int d_runtime, int lo, int hi,
                float scale, bool round_bf16, Scratch& s) {
  const int d = D > 0 ? D : d_runtime;
  const int g = G > 0 ? G : g_runtime;
  const int n = hi - lo + 1;
  float* qr = s.q.data();
  float* row = s.row.data();
  float* acc = s.acc.data();
  float* probs = s.probs.data();
  for (int i = 0; i < g * d; ++i) qr[i] = round_bf16 ? round_to_bf16(q[i]) : q[i];
  for (int t = 0; t < n; ++t) {
    const T* kr = k + size_t(lo + t) * d;
    for (int i = 0; i < d; ++i) row[i] = to_f32(kr[i]);
    for (int j = 0; j < g; ++j) {
      const float* qj = qr + j * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int i = 0; i < d; ++i) dot += qj[i] * row[i];
      probs[size_t(j) * n + t] = dot * scale;
    }
  }
  for (int j = 0; j < g; ++j) {
    float* p = probs + size_t(j) * n;
    float m = p[0];
    for (int t = 1; t < n; ++t) m = std::max(m, p[t]);
    for (int t = 0; t < n; ++t) p[t] = exp_nonpositive(p[t] - m);
    float sum = 0.f;
    for (int t = 0; t < n; ++t) sum += p[t];
    const float inv = 1.f / sum;
    for (int t = 0; t < n; ++t) p[t] = round_bf16 ? round_to_bf16(p[t] * inv) : p[t] * inv;
  }
  std::fill(acc, acc + g * d, 0.f);
  for (int t = 0; t < n; ++t) {
    const T* vr = v + size_t(lo + t) * d;
    for (int i = 0; i < d; ++i) row[i] = to_f32(vr[i]);
    for (int j = 0; j < g; ++j) {
      const float p = probs[size_t(j) * n + t];
      float* aj = acc + j * d;
      for (int i = 0; i < d; ++i) aj[i] += p * row[i];
    }
  }
  std::memcpy(out, acc, sizeof(float) * g * d);
}

// q [B, KV, G, D] float32; k, v [B, KV, S, D]; first [B]; last [1] -> out [B, KV, G, D] float32.
template <ffi::DataType KV>
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<KV> k,
                           ffi::Buffer<KV> v, ffi::Buffer<ffi::S32> first, ffi::Buffer<ffi::S32> last,
                           ffi::ResultBuffer<ffi::F32> out) {
  using T = std::conditional_t<KV == ffi::BF16, uint16_t, float>;
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3] || int64_t(first.element_count()) != qd[0] ||
      last.element_count() != 1)
    return ffi::Error::InvalidArgument("decode_attention: expected q [B, KV, G, D], k = v [B, KV, S, D], first [B], last [1]");
  const int b = qd[0], kv = qd[1], g = qd[2], d = qd[3], slots = kd[2];
  if (slots == 0 || g == 0 || d == 0) return ffi::Error::Success();
  const int hi = std::clamp(last.typed_data()[0], 0, slots - 1);
  const float scale = 1.f / std::sqrt(float(d));
  const float* qp = q.typed_data();
  const T* kp = reinterpret_cast<const T*>(k.untyped_data());
  const T* vp = reinterpret_cast<const T*>(v.untyped_data());
  const int32_t* fp = first.typed_data();
  float* op = out->typed_data();
  // Pairs are claimed one at a time by this thread and by helpers queued on the pool. This thread
  // waits only for pairs another thread has claimed, i.e. is running: no deadlock when every pool
  // thread is inside this kernel (XLA runs independent custom calls concurrently). A helper that
  // starts after the work is gone touches only `shared`, which it co-owns.
  struct Shared {
    std::atomic<int> next{0}, done{0};
    int total = 0;
    std::function<void(int, Scratch&)> pair;
  };
  auto shared = std::make_shared<Shared>();
  shared->total = b * kv;
  auto one = attend_one<T, 0, 0>;  // the common shapes compiled for their sizes
  if (d == 64 && g == 3) one = attend_one<T, 64, 3>;  // SmolLM2-135M
  else if (d == 64 && g == 1) one = attend_one<T, 64, 1>;
  else if (d == 64) one = attend_one<T, 64, 0>;
  else if (d == 128 && g == 4) one = attend_one<T, 128, 4>;  // Llama-3-8B
  else if (d == 128 && g == 1) one = attend_one<T, 128, 1>;
  else if (d == 128) one = attend_one<T, 128, 0>;
  shared->pair = [&](int pair, Scratch& s) {
    const int lo = std::clamp(fp[pair / kv], 0, hi);
    one(qp + size_t(pair) * g * d, kp + size_t(pair) * slots * d, vp + size_t(pair) * slots * d,
                  op + size_t(pair) * g * d, g, d, lo, hi, scale, KV == ffi::BF16, s);
  };
  auto drain = [g, d, slots](Shared& w) {
    if (w.next.load(std::memory_order_relaxed) >= w.total) return;
    Scratch s(g, d, slots);
    for (int i; (i = w.next.fetch_add(1, std::memory_order_relaxed)) < w.total;) {
      w.pair(i, s);
      w.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->total) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared, drain] { drain(*shared); });
  drain(*shared);
  // The pairs still running elsewhere take microseconds: spin rather than sleep.
  while (shared->done.load(std::memory_order_acquire) < shared->total) {
  }
  return ffi::Error::Success();
}

#define XINST_DECODE_ATTENTION_BINDING(KV) \
  ffi::Ffi::Bind()                         \
      .Ctx<ffi::ThreadPool>()              \
      .Arg<ffi::Buffer<ffi::F32>>()        \
      .Arg<ffi::Buffer<KV>>()              \
      .Arg<ffi::Buffer<KV>>()              \
      .Arg<ffi::Buffer<ffi::S32>>()        \
      .Arg<ffi::Buffer<ffi::S32>>()        \
      .Ret<ffi::Buffer<ffi::F32>>()

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XinstDecodeAttentionBf16, DecodeAttention<ffi::BF16>,
                              XINST_DECODE_ATTENTION_BINDING(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(XinstDecodeAttentionF32, DecodeAttention<ffi::F32>,
                              XINST_DECODE_ATTENTION_BINDING(ffi::F32));
