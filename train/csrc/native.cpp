// Compiled CPU kernels of saestrata.train.native: a per-row top-k of a [rows, n] tensor (float32 or
// bfloat16), the sampled dot products of the sparse decoder's backward, the decoder-gradient
// projection of unit-norm-decoder SAEs, an Adam step fused with it and the row renormalisation, and the
// fused TopK SAE training forward / backward
// (saestrata.train.fused), BatchTopK's batch-wide selection from the encoder matmul
// (saestrata.train.batchtopk), and the LM head's per-block softmax / KL statistics of spliced evaluation
// (saestrata.evaluate.branch). A per-pair read-modify-write of the output row was no faster than
// embedding_bag (2 threads, idle, 32k pairs, D 640: 1.52 vs 1.49 ms as a weight gradient, 1.29 vs
// 0.89 ms as the decode); the fused kernels keep each output block in vector registers instead.
//
// Why: torch's CPU topk costs ~0.5x of a TopK SAE step's encoder matmul at d_sae 4096, k 32
// (docs/results/bench/README.md, issue 14). Here each row takes two vectorized scans: the maxima of
// strided blocks give a lower bound on the k-th largest value, the second scan keeps the ~k entries
// at or above it, and an exact k-th largest among those (bisection on order-preserving integer keys)
// picks the winners without sorting (topk_row).
//
// Ties: of equal values the lower column index wins (a deterministic rule; torch's topk leaves it
// unspecified). Output per row: the k columns in ascending column order and their values.
// NaN ranks below every number (callers reject NaN activations; this only keeps the kernel safe).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// bf16 -> fp32 is the 16 bits shifted up; written out so that the compiler vectorizes the scans.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The build's native vector: 16 floats with AVX-512, else 8 (one ymm register); loads and stores go through
// memcpy (rows are only 4-byte aligned). The training kernels (dot, the Adam / projection kernels, decode_row,
// latent_grads, Matryoshka's nested ones) and the evaluation head's statistics (head_stats_rows) are written in
// it. They were written in 16 floats everywhere, and where registers hold 32 bytes GCC lowered those vectors
// through the stack (perf annotate of latent_grads on AMD Zen 3: 128-bit moves to and from the stack inside the
// pair loop). There, old and new builds timed in one process: at B 1024, d_in 640, d_sae 4096, k 32 the fused
// backward 21.0 -> 6.1 ms, forward 13.7 -> 6.5 ms (bench/topk_profile.py on the demo store's layer 8: TopK step
// 2.03x -> 1.46x the fp32 encoder matmul, docs/results/bench/topk_fp32_avx2_2026-12-07.txt); head_block_stats
// on a [5, 1025, 4096] block 78 -> 18 ms (fp32), 90 -> 24 ms (bf16). With AVX-512 vn is 16 floats as before:
// the kernels compile to the same instructions. On AVX2 their sums group 8 lanes, not 16, so the last bits of
// dot products, squared norms and the head's sums differ from the 16-float build's (each deterministic; ~3e-8
// relative in head_block_stats, ~2e-7 in the forward's).
#ifdef __AVX512F__
typedef float vn __attribute__((vector_size(64)));
#else
typedef float vn __attribute__((vector_size(32)));
#endif
constexpr int VN = sizeof(vn) / sizeof(float);
inline vn loadn(const float* p) {
  vn v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storen(float* p, vn v) { std::memcpy(p, &v, sizeof v); }
inline vn sqrtn(vn v) {
#if defined(__AVX512F__)
  __m512 r = _mm512_sqrt_ps(reinterpret_cast<__m512&>(v));
  return reinterpret_cast<vn&>(r);
#elif defined(__AVX__)
  __m256 r = _mm256_sqrt_ps(reinterpret_cast<__m256&>(v));
  return reinterpret_cast<vn&>(r);
#else
  for (int j = 0; j < VN; ++j) v[j] = std::sqrt(v[j]);
  return v;
#endif
}

// A candidate of a row's top-k: its value and column.
struct Cand {
  float v;
  int64_t i;
};

// Floats as int32 keys in the same order (NaN excepted: callers map it to -inf first).
inline int32_t order_key(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i ^ ((i >> 31) & 0x7fffffff);
}
inline float key_float(int32_t key) {
  int32_t i = key ^ ((key >> 31) & 0x7fffffff);
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

// The k-th largest of n keys: the largest t with at least k keys >= t, by bisection on the 32-bit key
// range (32 vectorized counting passes; nth_element over the 128 block maxima of a row cost ~1.3 us,
// a quarter of the row's time, measured on this machine).
inline int32_t kth_largest_key(const int32_t* keys, int64_t n, int64_t k) {
  int64_t lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();  // count(>= lo) >= k
  while (lo < hi) {
    const int32_t mid = static_cast<int32_t>(lo + (hi - lo + 1) / 2);
    int32_t count = 0;  // int32 lanes: the count vectorizes
    for (int64_t j = 0; j < n; ++j) count += keys[j] >= mid;
    if (count >= k) lo = mid; else hi = mid - 1;
  }
  return static_cast<int32_t>(lo);
}

// The k-th largest of n floats (NaN counts as -inf).
inline float kth_largest(const float* v, int64_t n, int64_t k, std::vector<int32_t>& keys) {
  keys.resize(n);
  for (int64_t j = 0; j < n; ++j) keys[j] = order_key(v[j] == v[j] ? v[j] : -std::numeric_limits<float>::infinity());
  return key_float(kth_largest_key(keys.data(), n, k));
}

// Per-thread scratch of topk_row, reused across rows.
struct TopkScratch {
  std::vector<float> maxima, cv;  // block maxima; candidate values
  std::vector<int32_t> keys, ci;  // integer keys; candidate columns
  std::vector<Cand> cand;         // the row's k winners, ascending columns
};

// Appends the entries of x[0..16) that are >= tau (with columns j..j+16) to cv / ci at *cnt; the
// buffers have 16 entries of room past *cnt. AVX-512: compress within registers, then a full 16-lane
// store (compress straight to memory is slow on this machine's AMD Zen 4: 3.5 vs 1.9 ms per 1024 rows
// for the scan, one thread; a scalar append cost ~5 cycles an entry, most of the row's time).
inline void append_at_least(const float* x, int64_t j, float tau, float* cv, int32_t* ci, int64_t* cnt) {
#ifdef __AVX512F__
  const __m512 v = _mm512_loadu_ps(x);
  const __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(tau), _CMP_GE_OQ);
  const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_storeu_ps(cv + *cnt, _mm512_maskz_compress_ps(keep, v));
  _mm512_storeu_si512(ci + *cnt, _mm512_maskz_compress_epi32(keep, cols));
  *cnt += __builtin_popcount(keep);
#else
  for (int t = 0; t < 16; ++t) {
    cv[*cnt] = x[t];
    ci[*cnt] = static_cast<int32_t>(j + t);
    *cnt += x[t] >= tau;
  }
#endif
}

// mx[b] = the maximum of load(b), load(nb + b), ..., load((span - 1) nb + b) for b < nb: the strided-block maxima
// whose k-th largest bounds a row's k-th largest value from below (a vertical, vectorized max).
template <typename Load>
inline void block_maxima(Load load, int64_t nb, int64_t span, float* mx) {
  for (int64_t b = 0; b < nb; ++b) mx[b] = load(b);
  for (int64_t s = 1; s < span; ++s)
    for (int64_t b = 0; b < nb; ++b) {
      const float x = load(s * nb + b);
      mx[b] = x > mx[b] ? x : mx[b];
    }
}

// Writes the entries load(j) >= tau of j < n (values to cv, columns to ci, in column order) and returns their
// count; cv / ci need n + 32 entries. 32-column chunks with no hit skip the compress (append_at_least).
template <typename Load>
inline int64_t collect_at_least(Load load, int64_t n, float tau, float* cv, int32_t* ci) {
  constexpr int64_t CHUNK = 32;
  int64_t m = 0, j = 0;
  float chunk[CHUNK];
  for (; j + CHUNK <= n; j += CHUNK) {
    int hit = 0;
    for (int64_t t = 0; t < CHUNK; ++t) {
      chunk[t] = load(j + t);
      hit |= chunk[t] >= tau;
    }
    if (!hit) continue;
    append_at_least(chunk, j, tau, cv, ci, &m);
    append_at_least(chunk + 16, j + 16, tau, cv, ci, &m);
  }
  for (; j < n; ++j) {
    const float x = load(j);
    cv[m] = x;
    ci[m] = static_cast<int32_t>(j);
    m += x >= tau;
  }
  return m;
}

// One row: the maxima of k or more disjoint blocks of columns bound the k-th largest value from
// below (the k largest maxima are k values of the row), so every winner is >= that bound; only the
// entries at or above it (about k of them for i.i.d. columns) are candidates. Block b holds the
// columns b, b + nb, b + 2 nb, ... (span of them, nb = n / span), so the maxima are a vertical,
// vectorized max. span = n / (4 k), at most 32: measured on real layer-8 pre-activations (d_sae 4096,
// k 32, 1 thread) spans 8 / 16 / 32 / 64 / 128 took 8.1 / 7.1 / 5.5 / 5.7 / 8.2 ms per 1024 rows
// (~34 candidates per row at 16).
template <typename Load>
void topk_row(Load load, int64_t n, int64_t k, TopkScratch& ws) {
  const int64_t span = std::min<int64_t>(32, n / (4 * k));
  const int64_t nb = span > 0 ? n / span : 0;
  float tau = -std::numeric_limits<float>::infinity();
  if (span >= 2 && nb >= k) {
    ws.maxima.resize(nb);
    block_maxima(load, nb, span, ws.maxima.data());
    tau = kth_largest(ws.maxima.data(), nb, k, ws.keys);
  }
  if (static_cast<int64_t>(ws.cv.size()) < n + 32) {
    ws.cv.resize(n + 32);
    ws.ci.resize(n + 32);
  }
  float* cv = ws.cv.data();
  int32_t* ci = ws.ci.data();
  int64_t m = collect_at_least(load, n, tau, cv, ci);
  if (m < k) {  // only with NaN in the row (NaN >= tau is false): NaN ranks lowest
    for (m = 0; m < n; ++m) {
      float x = load(m);
      cv[m] = x == x ? x : -std::numeric_limits<float>::infinity();
      ci[m] = static_cast<int32_t>(m);
    }
  }
  ws.cand.resize(k);
  if (m == k) {
    for (int64_t c = 0; c < k; ++c) ws.cand[c] = {cv[c], ci[c]};
    return;
  }
  // More than k: the exact k-th largest value, then one pass in column order keeps everything above
  // it and, of the ties at it, the lowest columns.
  ws.keys.resize(m);
  for (int64_t c = 0; c < m; ++c) ws.keys[c] = order_key(cv[c]);
  const float thr = key_float(kth_largest_key(ws.keys.data(), m, k));
  int64_t ties = k;
  for (int64_t c = 0; c < m; ++c) ties -= cv[c] > thr;
  int64_t out = 0;
  for (int64_t c = 0; c < m && out < k; ++c)
    if (cv[c] > thr || (cv[c] == thr && ties-- > 0)) ws.cand[out++] = {cv[c], ci[c]};
}

template <typename scalar_t>
void topk_rows(const torch::Tensor& xc, int64_t k, torch::Tensor& values, torch::Tensor& indices) {
  const int64_t rows = xc.size(0), n = xc.size(1);
  const scalar_t* src = xc.data_ptr<scalar_t>();
  scalar_t* vout = values.data_ptr<scalar_t>();
  int64_t* iout = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    TopkScratch ws;
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* row = src + r * n;
      topk_row([row](int64_t j) { return to_float(row[j]); }, n, k, ws);
      const std::vector<Cand>& cand = ws.cand;
      for (int64_t t = 0; t < k; ++t) {
        iout[r * k + t] = cand[t].i;
        vout[r * k + t] = row[cand[t].i];  // the input's own value, bit-exact in its dtype
      }
    }
  });
}

std::vector<torch::Tensor> rowwise_topk(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "rowwise_topk: a CPU tensor is needed");
  TORCH_CHECK(x.dim() == 2, "rowwise_topk: a 2-D [rows, n] tensor is needed");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "rowwise_topk: k must be in [1, n]");
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), "rowwise_topk: n must fit in int32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rowwise_topk: float32 or bfloat16 input is needed");
  auto xc = x.contiguous();
  auto values = torch::empty({xc.size(0), k}, xc.options());
  auto indices = torch::empty({xc.size(0), k}, xc.options().dtype(at::kLong));
  if (xc.scalar_type() == at::kFloat)
    topk_rows<float>(xc, k, values, indices);
  else
    topk_rows<c10::BFloat16>(xc, k, values, indices);
  return {values, indices};
}

// <a, b> over D floats: four vector accumulators, so consecutive FMAs do not wait on each other.
inline float dot(const float* a, const float* b, int64_t D) {
  vn acc[4] = {};
  int64_t d = 0;
  for (; d + 4 * VN <= D; d += 4 * VN)
    for (int j = 0; j < 4; ++j) acc[j] += loadn(a + d + VN * j) * loadn(b + d + VN * j);
  for (; d + VN <= D; d += VN) acc[0] += loadn(a + d) * loadn(b + d);
  vn t = acc[0] + acc[1] + acc[2] + acc[3];
  float s = 0;
  for (int j = 0; j < VN; ++j) s += t[j];
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// grad[r] -= <grad[r], w[r]> w[r] for each row r of fp32 [rows, d] tensors, in one pass over both
// (torch's expression makes three [rows, d] temporaries).
void remove_parallel_(torch::Tensor grad, torch::Tensor w) {
  TORCH_CHECK(grad.device().is_cpu() && w.device().is_cpu(), "remove_parallel_: CPU tensors are needed");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "remove_parallel_: float32 is needed");
  TORCH_CHECK(grad.dim() == 2 && grad.sizes() == w.sizes(), "remove_parallel_: two [rows, d] tensors of one shape");
  TORCH_CHECK(grad.is_contiguous() && w.is_contiguous(), "remove_parallel_: contiguous tensors are needed");
  const int64_t rows = grad.size(0), d = grad.size(1);
  float* g = grad.data_ptr<float>();
  const float* v = w.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* gr = g + r * d;
      const float* wr = v + r * d;
      const float p = dot(gr, wr, d);
      for (int64_t c = 0; c < d; ++c) gr[c] -= p * wr[c];
    }
  });
}

// w[r] /= max(||w[r]||, eps) for each row of an fp32 [rows, d] tensor, in one pass (torch's
// expression reads w twice and writes a norm tensor). Division, not a reciprocal multiply, as torch.
void normalize_rows_(torch::Tensor w, double eps) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "normalize_rows_: a contiguous fp32 [rows, d] CPU tensor is needed");
  const int64_t rows = w.size(0), d = w.size(1);
  float* p = w.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* wr = p + r * d;
      const float n = std::max(std::sqrt(dot(wr, wr, d)), static_cast<float>(eps));
      for (int64_t c = 0; c < d; ++c) wr[c] /= n;
    }
  });
}

// Squared norm of each row of the projected gradient, sq[r] = ||g[r] - <g[r], w[r]> w[r]||^2, without
// writing the projection (adam_unit_rows_ applies it inside its update). Both rows stay in L1 between
// the dot and the sum. Per-row results, summed by the caller in row order: the total does not depend
// on how rows were split across threads.
torch::Tensor projected_row_sq_norms(torch::Tensor grad, torch::Tensor w) {
  TORCH_CHECK(grad.device().is_cpu() && w.device().is_cpu() && grad.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && grad.dim() == 2 && grad.sizes() == w.sizes() &&
                  grad.is_contiguous() && w.is_contiguous(),
              "projected_row_sq_norms: two contiguous fp32 [rows, d] CPU tensors of one shape are needed");
  const int64_t rows = grad.size(0), d = grad.size(1);
  auto out = torch::empty({rows}, grad.options().dtype(at::kDouble));
  const float* g = grad.data_ptr<float>();
  const float* v = w.data_ptr<float>();
  double* o = out.data_ptr<double>();
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* gr = g + r * d;
      const float* wr = v + r * d;
      const float p = dot(gr, wr, d);
      vn acc = {};
      int64_t c = 0;
      for (; c + VN <= d; c += VN) {
        const vn e = loadn(gr + c) - p * loadn(wr + c);  // remove_parallel_'s value
        acc += e * e;
      }
      double s = 0;
      for (int j = 0; j < VN; ++j) s += acc[j];
      for (; c < d; ++c) s += static_cast<double>(gr[c] - p * wr[c]) * (gr[c] - p * wr[c]);
      o[r] = s;
    }
  });
  return out;
}

// One Adam step (torch.optim.Adam: no weight decay, no amsgrad) on a unit-norm-row parameter w [rows, d],
// fused with the two constraints unit-norm-decoder SAEs put around it: the gradient row is projected
// off w[r] first (remove_parallel_), multiplied by grad_scale (the gradient clip's factor, 1 = none),
// and after the update w[r] is renormalised (normalize_rows_). One pass over w, grad, m and v instead
// of four; grad is read, not written. step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t)
// as torch computes them. Row r's maths depends on row r only: deterministic under any thread split.
void adam_unit_rows_(torch::Tensor w, torch::Tensor grad, torch::Tensor m, torch::Tensor v, double step_size,
                     double bc2_sqrt, double beta1, double beta2, double eps, double grad_scale, double norm_eps) {
  for (const auto* t : {&w, &grad, &m, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous() &&
                    t->sizes() == w.sizes(),
                "adam_unit_rows_: four contiguous fp32 [rows, d] CPU tensors of one shape are needed");
  const int64_t rows = w.size(0), d = w.size(1);
  float* wp = w.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float b2 = beta2, one_b1 = 1 - beta1, one_b2 = 1 - beta2, ss = step_size, bc2 = bc2_sqrt,
              ep = eps, sc = grad_scale, neps = norm_eps;
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* wr = wp + r * d;
      const float* gr = gp + r * d;
      float* mr = mp + r * d;
      float* vr = vp + r * d;
      const float p = dot(gr, wr, d);
      int64_t c = 0;
      for (; c + VN <= d; c += VN) {  // written out in vectors: the scalar loop did not vectorize (5x slower)
        const vn gc = (loadn(gr + c) - p * loadn(wr + c)) * sc;
        vn mc = loadn(mr + c), vc = loadn(vr + c);
        mc += one_b1 * (gc - mc);  // torch's exp_avg.lerp_(grad, 1 - beta1)
        vc = b2 * vc + one_b2 * gc * gc;
        storen(mr + c, mc);
        storen(vr + c, vc);
        storen(wr + c, loadn(wr + c) - ss * mc / (sqrtn(vc) / bc2 + ep));
      }
      for (; c < d; ++c) {
        const float gc = (gr[c] - p * wr[c]) * sc;
        mr[c] += one_b1 * (gc - mr[c]);
        vr[c] = b2 * vr[c] + one_b2 * gc * gc;
        wr[c] -= ss * mr[c] / (std::sqrt(vr[c]) / bc2 + ep);
      }
      const float n = std::max(std::sqrt(dot(wr, wr, d)), neps);
      for (int64_t j = 0; j < d; ++j) wr[j] /= n;
    }
  });
}

// out[n] = <g[bags[n]], w[cols[n]]> for fp32 g [n_bags, D], w [L, D]: the decoder input gradient
// of the sparse TopK decode, only at the N active pairs (saestrata.train.kernels._sampled_dot).
torch::Tensor sampled_dot(torch::Tensor g, torch::Tensor w, torch::Tensor bags, torch::Tensor cols) {
  TORCH_CHECK(g.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "sampled_dot: float32 is needed");
  TORCH_CHECK(g.is_contiguous() && w.is_contiguous() && bags.is_contiguous() && cols.is_contiguous(),
              "sampled_dot: contiguous tensors are needed");
  TORCH_CHECK(g.size(1) == w.size(1) && bags.numel() == cols.numel(), "sampled_dot: shapes do not match");
  const int64_t N = cols.numel(), D = g.size(1);
  auto out = torch::empty({N}, g.options());
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t* bp = bags.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      op[n] = dot(gp + bp[n] * D, wp + cp[n] * D, D);
    }
  });
  return out;
}


// ---- BatchTopK's selection (saestrata.train.batchtopk) ----------------------------------------------
// The n largest positive entries of pre = mm + b_enc over the whole [B, L] batch (Bussmann et al. 2024,
// sec. 3), the sum formed in fp32 on the fly as torch's type promotion forms the dense path's pre, which is
// never written out (torch's path wrote it, ReLU'd it, compared it with a sampled bound and gathered:
// ~9 ms of a 41 ms BatchTopK step at B 1024, L 4096, bench/topk_profile.py --arch batchtopk). The bound is
// topk_row's: each row's strided-block maxima are distinct entries, so the n-th largest of all rows'
// maxima bounds the n-th largest entry from below (here the floor of its 16-bit key bucket, from a
// histogram the threads fill while they scan: no serial selection over the B * L / span maxima); a second
// scan keeps each row's entries at or above it (and > 0) with a histogram of their buckets, and the exact
// n-th largest is then looked for only in its bucket. Of entries tied with the n-th largest the lowest
// (row, column) win (torch's topk leaves ties unspecified). NaN is never selected.
constexpr int64_t KEY_BUCKETS = 1 << 16;
inline uint32_t key_bucket(float x) {  // the top 16 bits of an order-preserving unsigned key
  return (static_cast<uint32_t>(order_key(x)) ^ 0x80000000u) >> 16;
}
inline float bucket_floor(uint32_t bucket) {  // the smallest float in a bucket
  return key_float(static_cast<int32_t>((bucket << 16) ^ 0x80000000u));
}

// Adds a thread's histogram into the shared one.
void merge_histogram(const std::vector<int64_t>& mine, std::vector<int64_t>& all, std::mutex& lock) {
  std::lock_guard<std::mutex> guard(lock);
  for (int64_t b = 0; b < KEY_BUCKETS; ++b) all[b] += mine[b];
}

// The bucket holding the n-th largest counted key, and how many keys lie in the buckets above it.
std::pair<uint32_t, int64_t> nth_bucket(const std::vector<int64_t>& hist, int64_t n) {
  int64_t above = 0;
  for (int64_t b = KEY_BUCKETS - 1; b > 0; --b) {
    if (above + hist[b] >= n) return {static_cast<uint32_t>(b), above};
    above += hist[b];
  }
  return {0u, above};
}

struct RowRun {  // one thread's contiguous rows: their candidates in row then column order
  int64_t lo = 0;
  std::vector<float> v;
  std::vector<int32_t> col;
  std::vector<int64_t> count;  // per row of [lo, lo + count.size())
};

template <typename scalar_t>
std::vector<torch::Tensor> batch_select(const torch::Tensor& mm, const float* bias, int64_t n) {
  const int64_t B = mm.size(0), L = mm.size(1);
  const scalar_t* src = mm.data_ptr<scalar_t>();
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t k = std::max<int64_t>(1, (n + B - 1) / B);  // a row's mean share
  const int64_t span = std::min<int64_t>(32, L / (4 * k));
  const int64_t nb = span >= 2 ? L / span : 0;
  std::mutex lock;
  float tau = ninf;
  if (nb > 0 && nb * B >= n) {
    std::vector<int64_t> hist(KEY_BUCKETS, 0);
    at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> mx(nb);
      std::vector<int64_t> mine(KEY_BUCKETS, 0);
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = src + r * L;
        block_maxima([row, bias](int64_t j) { return to_float(row[j]) + bias[j]; }, nb, span, mx.data());
        for (int64_t b = 0; b < nb; ++b) ++mine[key_bucket(mx[b] == mx[b] ? mx[b] : ninf)];
      }
      merge_histogram(mine, hist, lock);
    });
    tau = bucket_floor(nth_bucket(hist, n).first);
  }
  // Entries >= thr are candidates; thr > 0 always, so a candidate is positive.
  const float thr = tau > 0 ? tau : std::numeric_limits<float>::denorm_min();
  std::vector<RowRun> runs;
  std::vector<int64_t> hist(KEY_BUCKETS, 0);
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    RowRun run;
    run.lo = lo;
    std::vector<float> cv(L + 32);
    std::vector<int32_t> ci(L + 32);
    std::vector<int64_t> mine(KEY_BUCKETS, 0);
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* row = src + r * L;
      const int64_t m = collect_at_least([row, bias](int64_t j) { return to_float(row[j]) + bias[j]; }, L, thr,
                                         cv.data(), ci.data());
      for (int64_t c = 0; c < m; ++c) ++mine[key_bucket(cv[c])];
      run.v.insert(run.v.end(), cv.begin(), cv.begin() + m);
      run.col.insert(run.col.end(), ci.begin(), ci.begin() + m);
      run.count.push_back(m);
    }
    merge_histogram(mine, hist, lock);
    std::lock_guard<std::mutex> guard(lock);
    runs.push_back(std::move(run));
  });
  std::sort(runs.begin(), runs.end(), [](const RowRun& a, const RowRun& b) { return a.lo < b.lo; });
  int64_t total = 0;
  for (const RowRun& run : runs) total += static_cast<int64_t>(run.v.size());
  // More than n candidates: the exact n-th largest, looked for among its bucket's candidates only, then
  // keep everything above it and the first ties.
  float cut = ninf;
  int64_t ties = 0;
  if (total > n) {
    const auto [bucket, above] = nth_bucket(hist, n);
    std::vector<int32_t> keys;
    for (const RowRun& run : runs)
      for (float v : run.v)
        if (key_bucket(v) == bucket) keys.push_back(order_key(v));
    const int64_t r = n - above;  // 1 <= r <= keys.size()
    std::nth_element(keys.begin(), keys.begin() + (r - 1), keys.end(), std::greater<int32_t>());
    cut = key_float(keys[r - 1]);
    ties = r;
    for (int32_t key : keys) ties -= key_float(key) > cut;
  }
  const int64_t N = std::min(total, n);
  auto opts = mm.options();
  auto rows_out = torch::empty({N}, opts.dtype(at::kLong)), cols_out = torch::empty({N}, opts.dtype(at::kLong));
  auto vals_out = torch::empty({N}, opts.dtype(at::kFloat));
  int64_t* ro = rows_out.data_ptr<int64_t>();
  int64_t* co = cols_out.data_ptr<int64_t>();
  float* vo = vals_out.data_ptr<float>();
  int64_t out = 0;
  for (const RowRun& run : runs) {
    int64_t c = 0;
    for (int64_t i = 0; i < static_cast<int64_t>(run.count.size()); ++i) {
      const int64_t r = run.lo + i;
      for (int64_t end = c + run.count[i]; c < end; ++c) {
        const float v = run.v[c];
        if (total > n && !(v > cut || (v == cut && ties-- > 0))) continue;
        ro[out] = r;
        co[out] = run.col[c];
        vo[out] = v;
        ++out;
      }
    }
  }
  TORCH_CHECK(out == N, "batch_topk_select: internal count mismatch");
  return {rows_out, cols_out, vals_out};
}

// mm [B, L] fp32 or bf16 (the encoder matmul without its bias), b_enc fp32 [L], n >= 1 ->
// (rows long [N], cols long [N], values fp32 [N]) in row then column order, N = min(n, #(pre > 0)).
std::vector<torch::Tensor> batch_topk_select(torch::Tensor mm, torch::Tensor b_enc, int64_t n) {
  TORCH_CHECK(mm.device().is_cpu() && mm.dim() == 2, "batch_topk_select: a 2-D CPU [B, L] tensor is needed");
  TORCH_CHECK(mm.scalar_type() == at::kFloat || mm.scalar_type() == at::kBFloat16,
              "batch_topk_select: float32 or bfloat16 mm is needed");
  TORCH_CHECK(b_enc.scalar_type() == at::kFloat && b_enc.numel() == mm.size(1),
              "batch_topk_select: an fp32 b_enc of mm's width is needed");
  TORCH_CHECK(n >= 1 && n <= mm.numel(), "batch_topk_select: n must be in [1, B * L]");
  TORCH_CHECK(mm.size(1) <= std::numeric_limits<int32_t>::max(), "batch_topk_select: L must fit in int32");
  auto m = mm.contiguous();
  auto be = b_enc.contiguous();
  if (m.scalar_type() == at::kFloat) return batch_select<float>(m, be.data_ptr<float>(), n);
  return batch_select<c10::BFloat16>(m, be.data_ptr<float>(), n);
}

// ---- The fused TopK SAE training step (saestrata.train.fused) ------------------------------------
// Forward: per row, the top-k of pre = mm + b_enc (mm the encoder matmul without its bias, bf16 under
// autocast or fp32; the sum is formed in fp32 as torch's type promotion does, so the selection is the
// dense path's), then x_hat = b_dec + sum_t relu(v_t) W_dec[c_t]. Neither pre nor an active-pair list
// is materialised; the forward also forms each row's error e = x_hat - x and <e, W_dec[c]> per pair while
// the row's k decoder rows are in cache. Backward (g = dloss/dx_hat = coef e): dv = relu'(v) coef <e, W_dec[c]>
// per pair, then, grouped by latent (a counting sort of the B k pairs), one pass per latent writes its rows
// of dW_dec, dW_enc^T and db_enc (zeros for latents that did not fire, so no separate zero-fill pass over
// the [L, D] gradients) and the squared norms the gradient clip needs.

// Rows are visited in an order the hardware prefetcher cannot guess: fetch the block PREFETCH pairs
// ahead (as fbgemm's embedding_bag kernels, which torch's embedding_bag runs, do).
constexpr int64_t PREFETCH = 8;
inline void prefetch_block(const float* p, int64_t n) {
  for (int64_t d = 0; d < n; d += 16) __builtin_prefetch(p + d);
}

// x = b_dec + sum over the candidates with v > 0 of v W[i]: the output held in 8 vector registers per
// 128-float block while all k rows stream through (a read-modify-write of x per pair was 2x slower
// than torch's embedding_bag).
void decode_row(const std::vector<Cand>& cand, const float* W, const float* b_dec, int64_t D, float* x) {
  int64_t d0 = 0;
  for (; d0 + 8 * VN <= D; d0 += 8 * VN) {
    vn acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = loadn(b_dec + d0 + VN * j);
    const int64_t m = static_cast<int64_t>(cand.size());
    for (int64_t t = 0; t < m; ++t) {
      const Cand& c = cand[t];
      if (t + PREFETCH < m) prefetch_block(W + cand[t + PREFETCH].i * D + d0, 8 * VN);
      if (!(c.v > 0)) continue;
      const float* w = W + c.i * D + d0;
      for (int j = 0; j < 8; ++j) acc[j] += c.v * loadn(w + VN * j);
    }
    for (int j = 0; j < 8; ++j) storen(x + d0 + VN * j, acc[j]);
  }
  for (int64_t d = d0; d < D; ++d) {
    float a = b_dec[d];
    for (const Cand& c : cand)
      if (c.v > 0) a += c.v * W[c.i * D + d];
    x[d] = a;
  }
}

// Row r's error terms, while its k decoder rows are still in this core's cache: e = x_hat - x (the
// backward's g is a multiple of it), ||e||^2, and de[t] = <e, W_dec[c_t]> for pairs with v > 0 (0
// otherwise), which the backward scales into dloss / dv: no second gather of k W_dec rows per row there.
void error_row(const std::vector<Cand>& cand, const float* W, const float* x_hat, const float* x, int64_t D,
               float* e, float* sq, float* de) {
  int64_t d = 0;
  for (; d + VN <= D; d += VN) storen(e + d, loadn(x_hat + d) - loadn(x + d));
  for (; d < D; ++d) e[d] = x_hat[d] - x[d];
  *sq = dot(e, e, D);
  const int64_t m = static_cast<int64_t>(cand.size());
  for (int64_t t = 0; t < m; ++t) de[t] = cand[t].v > 0 ? dot(e, W + cand[t].i * D, D) : 0.f;
}

template <typename scalar_t>
void fused_forward_rows(const torch::Tensor& mm, const float* bias, int64_t k, const float* W, const float* b_dec,
                        const float* x, int64_t D, int64_t* iout, float* vout, float* xout, float* eout, float* sqout,
                        float* deout) {
  const int64_t rows = mm.size(0), n = mm.size(1);
  const scalar_t* src = mm.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    TopkScratch ws;
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* row = src + r * n;
      topk_row([row, bias](int64_t j) { return to_float(row[j]) + bias[j]; }, n, k, ws);
      const std::vector<Cand>& cand = ws.cand;
      for (int64_t t = 0; t < k; ++t) {
        iout[r * k + t] = cand[t].i;
        vout[r * k + t] = cand[t].v;
      }
      decode_row(cand, W, b_dec, D, xout + r * D);
      error_row(cand, W, xout + r * D, x + r * D, D, eout + r * D, sqout + r, deout + r * k);
    }
  });
}

// x fp32 [B, D] the SAE's input. -> (indices long [B, k] ascending per row, values fp32 [B, k]
// (pre-activations, before ReLU), x_hat fp32 [B, D], e = x_hat - x fp32 [B, D], ||e||^2 per row fp32 [B],
// de = <e, W_dec[c]> per pair fp32 [B, k] (0 where v <= 0)).
std::vector<torch::Tensor> topk_fused_forward(torch::Tensor mm, torch::Tensor b_enc, int64_t k, torch::Tensor W_dec,
                                              torch::Tensor b_dec, torch::Tensor x) {
  TORCH_CHECK(mm.device().is_cpu() && mm.dim() == 2, "topk_fused_forward: a 2-D CPU [B, L] tensor is needed");
  TORCH_CHECK(mm.scalar_type() == at::kFloat || mm.scalar_type() == at::kBFloat16,
              "topk_fused_forward: float32 or bfloat16 mm is needed");
  TORCH_CHECK(k >= 1 && k <= mm.size(1), "topk_fused_forward: k must be in [1, L]");
  TORCH_CHECK(mm.size(1) <= std::numeric_limits<int32_t>::max(), "topk_fused_forward: L must fit in int32");
  TORCH_CHECK(b_enc.scalar_type() == at::kFloat && W_dec.scalar_type() == at::kFloat &&
                  b_dec.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "topk_fused_forward: fp32 parameters and input are needed");
  TORCH_CHECK(W_dec.dim() == 2 && W_dec.size(0) == mm.size(1) && b_enc.numel() == mm.size(1) &&
                  b_dec.numel() == W_dec.size(1) && x.dim() == 2 && x.size(0) == mm.size(0) &&
                  x.size(1) == W_dec.size(1), "topk_fused_forward: shapes do not match");
  auto m = mm.contiguous();
  auto be = b_enc.contiguous(), W = W_dec.contiguous(), bd = b_dec.contiguous(), xc = x.contiguous();
  const int64_t B = m.size(0), D = W.size(1);
  auto f32 = m.options().dtype(at::kFloat);
  auto idx = torch::empty({B, k}, m.options().dtype(at::kLong));
  auto val = torch::empty({B, k}, f32);
  auto x_hat = torch::empty({B, D}, f32), err = torch::empty({B, D}, f32);
  auto sq = torch::empty({B}, f32), de = torch::empty({B, k}, f32);
  auto run = [&](auto tag) {
    fused_forward_rows<decltype(tag)>(m, be.data_ptr<float>(), k, W.data_ptr<float>(), bd.data_ptr<float>(),
                                      xc.data_ptr<float>(), D, idx.data_ptr<int64_t>(), val.data_ptr<float>(),
                                      x_hat.data_ptr<float>(), err.data_ptr<float>(), sq.data_ptr<float>(),
                                      de.data_ptr<float>());
  };
  if (m.scalar_type() == at::kFloat)
    run(float{});
  else
    run(c10::BFloat16{});
  return {idx, val, x_hat, err, sq, de};
}

// Pairs in latent order, compact: the latent loop below re-reads them once per 64-float block.
struct Pair {
  int32_t row;  // the pair's batch row (indexes x)
  int32_t bag;  // the row of e it reads: its batch row, or its (row, prefix group) bag for Matryoshka
  float v;   // the pair's activation (0 when ReLU'd away: it then adds nothing)
  float dv;  // dloss / d pre-activation
};

// Latents lo..hi's gradient rows: dW_dec[c] = coef sum v e[bag], dW_enc^T[c] = sum dv (x[row] - b_dec)
// (e = x_hat - x, g = coef e, bag = row; for Matryoshka e[bag] is d loss / d its group's decode, coef 1;
// dv already holds coef).
// Blocked by 64 columns outermost: one block of e and x over all rows (B x 64 x 2 floats, 512 KB at
// B 1024) stays in this core's L2 while every latent of the range streams its pairs through it,
// where a latent-by-latent sweep over whole rows fetched every row from L3 (~2x slower, measured).
// Both outputs of a block stay in vector registers (see decode_row).
// Also adds sum_c db_enc[c] W_enc[:, c] over the range into wdb [D] (the encoder's share of db_dec;
// W_encT is W_enc^T, [L, D], contiguous), while the block is in registers: no separate pass over W_enc;
// and the squared norms of both output rows into sq_dec[c] / sq_enc[c] (the gradient clip's norm, which
// then needs no pass over the [L, D] gradients: train/optim.py).
void latent_grads(const Pair* pairs, const int64_t* start, int64_t lo, int64_t hi, const float* e, float coef,
                  const float* x, const float* b_dec, const float* db_enc, const float* W_encT, int64_t D,
                  float* d_dec, float* d_enc, float* wdb, double* sq_dec, double* sq_enc) {
  const int64_t end = start[hi];
  for (int64_t c = lo; c < hi; ++c) sq_dec[c] = sq_enc[c] = 0;
  int64_t d0 = 0;
  for (; d0 + 4 * VN <= D; d0 += 4 * VN) {
    vn bd[4], acc_b[4] = {};
    for (int j = 0; j < 4; ++j) bd[j] = loadn(b_dec + d0 + VN * j);
    for (int64_t c = lo; c < hi; ++c) {
      for (int j = 0; j < 4; ++j) acc_b[j] += db_enc[c] * loadn(W_encT + c * D + d0 + VN * j);
      vn a_dec[4] = {}, a_enc[4] = {};
      for (int64_t s = start[c]; s < start[c + 1]; ++s) {
        const Pair& p = pairs[s];
        if (s + PREFETCH < end) {
          prefetch_block(e + pairs[s + PREFETCH].bag * D + d0, 4 * VN);
          prefetch_block(x + pairs[s + PREFETCH].row * D + d0, 4 * VN);
        }
        const float* er = e + p.bag * D + d0;
        const float* xr = x + p.row * D + d0;
        for (int j = 0; j < 4; ++j) {
          a_dec[j] += p.v * loadn(er + VN * j);
          a_enc[j] += p.dv * (loadn(xr + VN * j) - bd[j]);
        }
      }
      vn q_dec = {}, q_enc = {};
      for (int j = 0; j < 4; ++j) {
        a_dec[j] *= coef;
        q_dec += a_dec[j] * a_dec[j];
        q_enc += a_enc[j] * a_enc[j];
        storen(d_dec + c * D + d0 + VN * j, a_dec[j]);
        storen(d_enc + c * D + d0 + VN * j, a_enc[j]);
      }
      float qd = 0, qe = 0;
      for (int j = 0; j < VN; ++j) qd += q_dec[j], qe += q_enc[j];
      sq_dec[c] += qd;
      sq_enc[c] += qe;
    }
    for (int j = 0; j < 4; ++j) storen(wdb + d0 + VN * j, loadn(wdb + d0 + VN * j) + acc_b[j]);
  }
  for (int64_t c = lo; c < hi; ++c)
    for (int64_t d = d0; d < D; ++d) {
      wdb[d] += db_enc[c] * W_encT[c * D + d];
      float a = 0, b = 0;
      for (int64_t s = start[c]; s < start[c + 1]; ++s) {
        const Pair& p = pairs[s];
        a += p.v * e[p.bag * D + d];
        b += p.dv * (x[p.row * D + d] - b_dec[d]);
      }
      a *= coef;
      d_dec[c * D + d] = a;
      d_enc[c * D + d] = b;
      sq_dec[c] += double(a) * a;
      sq_enc[c] += double(b) * b;
    }
}

// The latent-grouped backward shared by the per-row top-k step and the given-pairs step: pair n has column
// ip[n], value vp[n], de dep[n], row row_of(n) (of x) and bag bag_of(n) (of e); dv (fp32, N entries, any
// shape) is filled here: coef de[n], plus addp[n] when addp is given (a penalty's own d loss / d v, e.g. the
// standard SAE's weighted L1; sq[0]'s shortcut <dW_dec[c], W_dec[c]> = sum v dv then no longer holds).
template <typename RowOf, typename BagOf>
std::vector<torch::Tensor> fused_backward(const torch::Tensor& ec, double coef, const int64_t* ip, const float* vp,
                                          const float* dep, int64_t N, RowOf row_of, BagOf bag_of, torch::Tensor dv,
                                          const torch::Tensor& xc, const torch::Tensor& bd, const torch::Tensor& WeT,
                                          const float* addp = nullptr) {
  const int64_t D = ec.size(1), L = WeT.size(0);
  const float cf = coef;
  float* dvp = dv.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) dvp[n] = cf * dep[n];  // de is 0 where v <= 0 (relu')
  if (addp != nullptr)
    for (int64_t n = 0; n < N; ++n) dvp[n] += addp[n];
  // Counting sort of the pairs by latent (stable: rows ascending within a latent).
  std::vector<int64_t> start(L + 1, 0);
  std::vector<Pair> pairs(N);
  for (int64_t n = 0; n < N; ++n) ++start[ip[n] + 1];
  for (int64_t c = 0; c < L; ++c) start[c + 1] += start[c];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n)
      pairs[fill[ip[n]]++] = {static_cast<int32_t>(row_of(n)), static_cast<int32_t>(bag_of(n)), vp[n] > 0 ? vp[n] : 0.f,
                              dvp[n]};
  }
  auto dWencT = torch::empty({L, D}, ec.options());
  auto db_enc = torch::empty({L}, ec.options());
  auto dWdec = torch::empty({L, D}, ec.options());
  float* bep = db_enc.data_ptr<float>();
  std::vector<double> sq_dec(L), sq_enc(L), along(L);
  // One task per thread, split by pair count, not latent count: firing rates differ by orders of
  // magnitude across latents, so equal latent ranges need not carry equal work (on layer 8 after 40
  // steps the two halves held 53% / 47% of the pairs; skew grows with dead and dense latents).
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L));
  std::vector<int64_t> bound(T + 1, L);
  bound[0] = 0;
  for (int64_t t = 1, c = 0; t < T; ++t) {
    while (c < L && start[c] < N * t / T) ++c;
    bound[t] = c;
  }
  std::vector<float> partial(T * D, 0.f);  // per-task W_enc db_enc, summed in task order: deterministic
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = bound[t], hi = bound[t + 1];
      for (int64_t c = lo; c < hi; ++c) {
        float bsum = 0;
        double a = 0;
        for (int64_t s = start[c]; s < start[c + 1]; ++s) {
          bsum += pairs[s].dv;
          a += double(pairs[s].v) * pairs[s].dv;  // <dW_dec[c], W_dec[c]>: dv = coef <e, W_dec[c]>
        }
        bep[c] = bsum;
        along[c] = a;
      }
      latent_grads(pairs.data(), start.data(), lo, hi, ec.data_ptr<float>(), cf, xc.data_ptr<float>(),
                   bd.data_ptr<float>(), bep, WeT.data_ptr<float>(), D, dWdec.data_ptr<float>(),
                   dWencT.data_ptr<float>(), partial.data() + t * D, sq_dec.data(), sq_enc.data());
    }
  });
  auto enc_b_dec = torch::zeros({D}, ec.options());
  float* eb = enc_b_dec.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) eb[d] += partial[t * D + d];
  auto sq = torch::zeros({2}, ec.options().dtype(at::kDouble));
  double* sqp = sq.data_ptr<double>();
  for (int64_t c = 0; c < L; ++c) {
    sqp[0] += std::max(sq_dec[c] - along[c] * along[c], 0.0);
    sqp[1] += sq_enc[c];
  }
  return {dv, dWencT, db_enc, dWdec, enc_b_dec, sq};
}

// e = x_hat - x fp32 [B, D] and coef (g = dloss/dx_hat = coef e); idx, val and de = <e, W_dec[c]> from
// the forward; x fp32 [B, D]; b_dec [D]; W_encT = W_enc^T fp32 [L, D]. -> (dv fp32 [B, k], dW_enc^T fp32
// [L, D], db_enc fp32 [L], dW_dec fp32 [L, D], W_enc db_enc fp32 [D], sq fp64 [2]). The caller forms
// db_dec = sum_b g[b] - W_enc db_enc and, if needed, dx = sum_t dv W_enc[:, c_t]. sq = (sum_c ||dW_dec[c]
// - <dW_dec[c], W_dec[c]> W_dec[c]||^2, ||dW_enc||^2): the squared norms of the decoder gradient
// projected off its unit rows (W_dec's rows taken as unit: the optimiser renormalises them every step)
// and of the encoder gradient, summed latent by latent in latent order (thread-count independent), with
// <dW_dec[c], W_dec[c]> = sum over c's pairs of v dv (no read of W_dec).
std::vector<torch::Tensor> topk_fused_backward(torch::Tensor e, double coef, torch::Tensor idx, torch::Tensor val,
                                               torch::Tensor de, torch::Tensor x, torch::Tensor b_dec,
                                               torch::Tensor W_encT) {
  TORCH_CHECK(e.scalar_type() == at::kFloat && val.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
                  b_dec.scalar_type() == at::kFloat && de.scalar_type() == at::kFloat &&
                  idx.scalar_type() == at::kLong, "topk_fused_backward: fp32 tensors and long indices are needed");
  TORCH_CHECK(e.dim() == 2 && e.sizes() == x.sizes() && idx.sizes() == val.sizes() && de.sizes() == val.sizes() &&
                  idx.size(0) == e.size(0) && b_dec.numel() == e.size(1), "topk_fused_backward: shapes do not match");
  TORCH_CHECK(W_encT.scalar_type() == at::kFloat && W_encT.dim() == 2 && W_encT.size(1) == e.size(1),
              "topk_fused_backward: W_enc^T must be fp32 [L, D]");
  TORCH_CHECK(e.size(0) <= std::numeric_limits<int32_t>::max(), "topk_fused_backward: too many rows");
  auto ec = e.contiguous(), ic = idx.contiguous(), vc = val.contiguous(), xc = x.contiguous(), dc = de.contiguous();
  auto bd = b_dec.contiguous(), WeT = W_encT.contiguous();
  const int64_t B = ec.size(0), k = ic.size(1);
  return fused_backward(ec, coef, ic.data_ptr<int64_t>(), vc.data_ptr<float>(), dc.data_ptr<float>(), B * k,
                        [k](int64_t n) { return n / k; }, [k](int64_t n) { return n / k; },
                        torch::empty({B, k}, ec.options()), xc, bd, WeT);
}

// ---- The same step on given pairs (BatchTopK, whose rows hold varying numbers of latents) ----
// Row-sorted pairs: crow [B + 1] offsets, cols long [N], vals fp32 [N] (pre-activations, before ReLU).
// -> (x_hat fp32 [B, D], e = x_hat - x fp32 [B, D], ||e||^2 per row fp32 [B], de = <e, W_dec[c]> fp32 [N], 0
// where v <= 0): topk_fused_forward's decode and error terms without its selection.
std::vector<torch::Tensor> pairs_fused_forward(torch::Tensor crow, torch::Tensor cols, torch::Tensor vals,
                                               torch::Tensor W_dec, torch::Tensor b_dec, torch::Tensor x) {
  TORCH_CHECK(crow.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && vals.scalar_type() == at::kFloat &&
                  W_dec.scalar_type() == at::kFloat && b_dec.scalar_type() == at::kFloat &&
                  x.scalar_type() == at::kFloat, "pairs_fused_forward: long offsets / columns and fp32 tensors are needed");
  TORCH_CHECK(x.dim() == 2 && crow.numel() == x.size(0) + 1 && cols.numel() == vals.numel() && W_dec.dim() == 2 &&
                  W_dec.size(1) == x.size(1) && b_dec.numel() == x.size(1), "pairs_fused_forward: shapes do not match");
  auto cr = crow.contiguous(), cc = cols.contiguous(), vc = vals.contiguous();
  auto W = W_dec.contiguous(), bd = b_dec.contiguous(), xc = x.contiguous();
  const int64_t B = xc.size(0), D = xc.size(1);
  TORCH_CHECK(cr.data_ptr<int64_t>()[B] == cc.numel(), "pairs_fused_forward: offsets do not end at the pair count");
  auto f32 = xc.options();
  auto x_hat = torch::empty({B, D}, f32), err = torch::empty({B, D}, f32), sq = torch::empty({B}, f32);
  auto de = torch::empty({cc.numel()}, f32);
  const int64_t* rp = cr.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const float* vp = vc.data_ptr<float>();
  const float* Wp = W.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    std::vector<Cand> cand;
    for (int64_t r = lo; r < hi; ++r) {
      cand.clear();
      for (int64_t s = rp[r]; s < rp[r + 1]; ++s) cand.push_back({vp[s], cp[s]});
      float* xo = x_hat.data_ptr<float>() + r * D;
      decode_row(cand, Wp, bd.data_ptr<float>(), D, xo);
      error_row(cand, Wp, xo, xc.data_ptr<float>() + r * D, D, err.data_ptr<float>() + r * D,
                sq.data_ptr<float>() + r, de.data_ptr<float>() + rp[r]);
    }
  });
  return {x_hat, err, sq, de};
}

// topk_fused_backward on given pairs: rows long [N] (each pair's row of x), cols long [N], val / de fp32 [N], and
// bags long [N], each pair's row of e (its batch row, or for Matryoshka its (row, prefix group) bag, e then
// holding d loss / d (that group's decode) per bag, with coef 1); dv_add fp32 [N] added to each pair's dv, or
// empty (every pair's value must then be > 0: the adds carry no ReLU factor). -> (dv fp32 [N], dW_enc^T, db_enc,
// dW_dec, W_enc db_enc, sq) as there (sq[0] not the projected norm when dv_add is given).
std::vector<torch::Tensor> pairs_fused_backward(torch::Tensor e, double coef, torch::Tensor rows, torch::Tensor cols,
                                                torch::Tensor val, torch::Tensor de, torch::Tensor x,
                                                torch::Tensor b_dec, torch::Tensor W_encT, torch::Tensor bags,
                                                torch::Tensor dv_add) {
  TORCH_CHECK(e.scalar_type() == at::kFloat && val.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
                  b_dec.scalar_type() == at::kFloat && de.scalar_type() == at::kFloat &&
                  rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && bags.scalar_type() == at::kLong,
              "pairs_fused_backward: fp32 tensors and long indices are needed");
  TORCH_CHECK(e.dim() == 2 && x.dim() == 2 && e.size(1) == x.size(1) && rows.numel() == cols.numel() &&
                  bags.numel() == cols.numel() && val.numel() == cols.numel() && de.numel() == cols.numel() &&
                  b_dec.numel() == e.size(1), "pairs_fused_backward: shapes do not match");
  TORCH_CHECK(W_encT.scalar_type() == at::kFloat && W_encT.dim() == 2 && W_encT.size(1) == e.size(1),
              "pairs_fused_backward: W_enc^T must be fp32 [L, D]");
  TORCH_CHECK(e.size(0) <= std::numeric_limits<int32_t>::max(), "pairs_fused_backward: too many rows");
  auto ec = e.contiguous(), rc = rows.contiguous(), ic = cols.contiguous(), vc = val.contiguous();
  auto xc = x.contiguous(), dc = de.contiguous(), bd = b_dec.contiguous(), WeT = W_encT.contiguous();
  TORCH_CHECK(dv_add.numel() == 0 || (dv_add.scalar_type() == at::kFloat && dv_add.numel() == cols.numel()),
              "pairs_fused_backward: dv_add must be empty or fp32 [N]");
  auto gc = bags.contiguous(), ac = dv_add.contiguous();
  const int64_t* rp = rc.data_ptr<int64_t>();
  const int64_t* gp = gc.data_ptr<int64_t>();
  return fused_backward(ec, coef, ic.data_ptr<int64_t>(), vc.data_ptr<float>(), dc.data_ptr<float>(), ic.numel(),
                        [rp](int64_t n) { return rp[n]; }, [gp](int64_t n) { return gp[n]; },
                        torch::empty({ic.numel()}, ec.options()), xc, bd, WeT,
                        ac.numel() ? ac.data_ptr<float>() : nullptr);
}

// ---- Matryoshka's nested losses on its pairs (saestrata.train.fused._FusedNested) ----------------------
// Bags are (row, prefix group): bag r * G + g holds row r's latents of group g, in bag_crow [B * G + 1] order.
// Forward: per row, the running error E[r, m] = b_dec + sum_{g <= m} decode_g[r] - x[r] of every prefix m and its
// squared norm, one 128-float block at a time in registers while the row's decoder rows stream through (the
// torch version wrote each group's decode, then G running sums and G norms over [B, G, D]); then, while the
// row is in cache, the suffix sums S[r, g] = sum_{m >= g} E[r, m] in place (group g feeds every prefix from g
// on, so with equal loss weights w its decode's gradient is w S[r, g]) and each pair's de = <S[bag], W_dec[c]>.
// -> (S fp32 [B, G, D], sq = ||E[r, m]||^2 fp32 [B, G], de fp32 [N]). S[:, G - 1] = E[:, G - 1], the whole
// dictionary's error; E[:, m] = S[:, m] - S[:, m + 1].
std::vector<torch::Tensor> nested_fused_forward(torch::Tensor bag_crow, torch::Tensor cols, torch::Tensor vals,
                                                torch::Tensor W_dec, torch::Tensor b_dec, torch::Tensor x, int64_t G) {
  TORCH_CHECK(bag_crow.scalar_type() == at::kLong && cols.scalar_type() == at::kLong &&
                  vals.scalar_type() == at::kFloat && W_dec.scalar_type() == at::kFloat &&
                  b_dec.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "nested_fused_forward: long offsets / columns and fp32 tensors are needed");
  TORCH_CHECK(G >= 1 && x.dim() == 2 && bag_crow.numel() == x.size(0) * G + 1 && cols.numel() == vals.numel() &&
                  W_dec.dim() == 2 && W_dec.size(1) == x.size(1) && b_dec.numel() == x.size(1),
              "nested_fused_forward: shapes do not match");
  auto cr = bag_crow.contiguous(), cc = cols.contiguous(), vc = vals.contiguous();
  auto W = W_dec.contiguous(), bd = b_dec.contiguous(), xc = x.contiguous();
  const int64_t B = xc.size(0), D = xc.size(1);
  auto suffix = torch::empty({B, G, D}, xc.options()), sq = torch::zeros({B, G}, xc.options());
  auto de = torch::empty({cc.numel()}, xc.options());
  const int64_t* bp = cr.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const float* vp = vc.data_ptr<float>();
  const float* Wp = W.data_ptr<float>();
  const float* bdp = bd.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  float* ep = suffix.data_ptr<float>();
  float* sp = sq.data_ptr<float>();
  float* dp = de.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xp + r * D;
      float* er = ep + r * G * D;
      const int64_t last = bp[(r + 1) * G];
      int64_t d0 = 0;
      for (; d0 + 8 * VN <= D; d0 += 8 * VN) {
        vn acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = loadn(bdp + d0 + VN * j) - loadn(xr + d0 + VN * j);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t s = bp[r * G + g]; s < bp[r * G + g + 1]; ++s) {
            if (s + PREFETCH < last) prefetch_block(Wp + cp[s + PREFETCH] * D + d0, 8 * VN);
            const float* w = Wp + cp[s] * D + d0;
            for (int j = 0; j < 8; ++j) acc[j] += vp[s] * loadn(w + VN * j);
          }
          vn q = {};
          for (int j = 0; j < 8; ++j) {
            storen(er + g * D + d0 + VN * j, acc[j]);
            q += acc[j] * acc[j];
          }
          float t = 0;
          for (int j = 0; j < VN; ++j) t += q[j];
          sp[r * G + g] += t;
        }
      }
      for (int64_t d = d0; d < D; ++d) {
        float a = bdp[d] - xr[d];
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t s = bp[r * G + g]; s < bp[r * G + g + 1]; ++s) a += vp[s] * Wp[cp[s] * D + d];
          er[g * D + d] = a;
          sp[r * G + g] += a * a;
        }
      }
      for (int64_t g = G - 2; g >= 0; --g) {  // the row's errors -> suffix sums, in place
        int64_t d = 0;
        for (; d + VN <= D; d += VN) storen(er + g * D + d, loadn(er + g * D + d) + loadn(er + (g + 1) * D + d));
        for (; d < D; ++d) er[g * D + d] += er[(g + 1) * D + d];
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t s = bp[r * G + g]; s < bp[r * G + g + 1]; ++s) dp[s] = dot(er + g * D, Wp + cp[s] * D, D);
    }
  });
  return {suffix, sq, de};
}

// Backward preparation when the prefixes' loss weights differ (the trainer's equal weights need none: the
// forward's S and de serve): per row, the gradient of each group's decode, gbag[r, g] = sum_{m >= g} w[m]
// err[r, m] (err = E, w [G] = d loss / d errors[m] * 2 / B), then each pair's dv = <gbag[bag], W_dec[c]> while
// the row's gbag is in cache (the pairs' values are > 0: no ReLU factor).
// -> (gbag fp32 [B * G, D], dv fp32 [N]); pairs_fused_backward then takes gbag as its e with coef 1.
std::vector<torch::Tensor> nested_fused_grads(torch::Tensor err, torch::Tensor w, torch::Tensor bag_crow,
                                              torch::Tensor cols, torch::Tensor W_dec) {
  TORCH_CHECK(err.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && W_dec.scalar_type() == at::kFloat &&
                  bag_crow.scalar_type() == at::kLong && cols.scalar_type() == at::kLong,
              "nested_fused_grads: fp32 tensors and long offsets / columns are needed");
  TORCH_CHECK(err.dim() == 3 && w.numel() == err.size(1) && bag_crow.numel() == err.size(0) * err.size(1) + 1 &&
                  W_dec.dim() == 2 && W_dec.size(1) == err.size(2), "nested_fused_grads: shapes do not match");
  auto ec = err.contiguous(), wc = w.contiguous(), cr = bag_crow.contiguous(), cc = cols.contiguous();
  auto W = W_dec.contiguous();
  const int64_t B = ec.size(0), G = ec.size(1), D = ec.size(2);
  auto gbag = torch::empty({B * G, D}, ec.options()), dv = torch::empty({cc.numel()}, ec.options());
  const float* epp = ec.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const int64_t* bp = cr.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const float* Wp = W.data_ptr<float>();
  float* gp = gbag.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      int64_t d = 0;
      for (; d + VN <= D; d += VN) {
        vn acc = {};
        for (int64_t g = G - 1; g >= 0; --g) {
          acc += wp[g] * loadn(epp + (r * G + g) * D + d);
          storen(gp + (r * G + g) * D + d, acc);
        }
      }
      for (; d < D; ++d) {
        float a = 0;
        for (int64_t g = G - 1; g >= 0; --g) {
          a += wp[g] * epp[(r * G + g) * D + d];
          gp[(r * G + g) * D + d] = a;
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t s = bp[r * G + g]; s < bp[r * G + g + 1]; ++s)
          dvp[s] = dot(gp + (r * G + g) * D, Wp + cp[s] * D, D);
    }
  });
  return {gbag, dv};
}

// ---- AuxK on the dead latents' few positive pairs (Gao et al. 2024, app. A.2; saestrata.train.fused) ----
// Once latents die, AuxK decodes the residual -e from the k_aux largest pre-activations of the dead latents
// per row; ~0.03-0.2% of (token, dead latent) pre-activations are positive on layer 8, so after the ReLU a
// step has a few hundred to a few thousand pairs. Torch's ops for them (column gather of mm, topk, pair
// lists, embedding_bag, index_copy, norm corrections) cost ~4 ms a step at d_sae 4096 (bench/topk_auxk.py);
// these three calls do the same maths on the pairs' rows only.

// Per row, of the dead columns' pre = mm + b_enc (fp32, as torch's type promotion forms it) the k_aux
// largest that are > 0, in ascending column order; of entries tied with the k_aux-th the lower columns win.
template <typename scalar_t>
std::vector<torch::Tensor> auxk_rows(const torch::Tensor& mm, const float* bias, const int64_t* dead, int64_t nd,
                                     int64_t k) {
  const int64_t B = mm.size(0), L = mm.size(1);
  const scalar_t* src = mm.data_ptr<scalar_t>();
  std::vector<float> db(nd);
  for (int64_t j = 0; j < nd; ++j) db[j] = bias[dead[j]];
  std::vector<RowRun> runs;
  std::mutex lock;
  at::parallel_for(0, B, 64, [&](int64_t lo, int64_t hi) {
    RowRun run;
    run.lo = lo;
    std::vector<float> cv(nd);
    std::vector<int32_t> ci(nd), keys;
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* row = src + r * L;
      int64_t m = 0;
      for (int64_t j = 0; j < nd; ++j) {
        const float v = to_float(row[dead[j]]) + db[j];
        cv[m] = v;
        ci[m] = static_cast<int32_t>(dead[j]);
        m += v > 0;  // NaN is never kept
      }
      float thr = 0;
      int64_t ties = m;
      if (m > k) {
        keys.resize(m);
        for (int64_t c = 0; c < m; ++c) keys[c] = order_key(cv[c]);
        thr = key_float(kth_largest_key(keys.data(), m, k));
        ties = k;
        for (int64_t c = 0; c < m; ++c) ties -= cv[c] > thr;
      }
      int64_t kept = 0;
      for (int64_t c = 0; c < m; ++c)
        if (m <= k || cv[c] > thr || (cv[c] == thr && ties-- > 0)) {
          run.v.push_back(cv[c]);
          run.col.push_back(ci[c]);
          ++kept;
        }
      run.count.push_back(kept);
    }
    std::lock_guard<std::mutex> guard(lock);
    runs.push_back(std::move(run));
  });
  std::sort(runs.begin(), runs.end(), [](const RowRun& a, const RowRun& b) { return a.lo < b.lo; });
  int64_t N = 0;
  for (const RowRun& run : runs) N += static_cast<int64_t>(run.v.size());
  auto opts = mm.options();
  auto crow = torch::empty({B + 1}, opts.dtype(at::kLong)), cols = torch::empty({N}, opts.dtype(at::kLong));
  auto vals = torch::empty({N}, opts.dtype(at::kFloat));
  int64_t* cr = crow.data_ptr<int64_t>();
  int64_t* co = cols.data_ptr<int64_t>();
  float* vo = vals.data_ptr<float>();
  int64_t out = 0;
  cr[0] = 0;
  for (const RowRun& run : runs) {
    for (int64_t i = 0; i < static_cast<int64_t>(run.count.size()); ++i) cr[run.lo + i + 1] = cr[run.lo + i] + run.count[i];
    for (size_t c = 0; c < run.v.size(); ++c, ++out) {
      co[out] = run.col[c];
      vo[out] = run.v[c];
    }
  }
  return {crow, cols, vals};
}

// mm [B, L] fp32 or bf16 (the encoder matmul without its bias), b_enc fp32 [L], dead long [n_dead] (distinct
// columns, ascending), 1 <= k_aux <= n_dead -> (crow long [B + 1], cols long [N], vals fp32 [N]): the non-zeros
// of ReLU(TopK_{k_aux}(pre restricted to the dead columns)) in row then column order.
std::vector<torch::Tensor> auxk_select(torch::Tensor mm, torch::Tensor b_enc, torch::Tensor dead, int64_t k_aux) {
  TORCH_CHECK(mm.device().is_cpu() && mm.dim() == 2, "auxk_select: a 2-D CPU [B, L] tensor is needed");
  TORCH_CHECK(mm.scalar_type() == at::kFloat || mm.scalar_type() == at::kBFloat16,
              "auxk_select: float32 or bfloat16 mm is needed");
  TORCH_CHECK(b_enc.scalar_type() == at::kFloat && b_enc.numel() == mm.size(1),
              "auxk_select: an fp32 b_enc of mm's width is needed");
  TORCH_CHECK(dead.scalar_type() == at::kLong && dead.dim() == 1, "auxk_select: long dead columns are needed");
  TORCH_CHECK(k_aux >= 1 && k_aux <= dead.numel(), "auxk_select: k_aux must be in [1, n_dead]");
  TORCH_CHECK(mm.size(1) <= std::numeric_limits<int32_t>::max(), "auxk_select: L must fit in int32");
  auto m = mm.contiguous(), be = b_enc.contiguous(), dc = dead.contiguous();
  const int64_t* dp = dc.data_ptr<int64_t>();
  for (int64_t j = 0; j < dc.numel(); ++j)
    TORCH_CHECK(dp[j] >= 0 && dp[j] < m.size(1) && (j == 0 || dp[j] > dp[j - 1]),
                "auxk_select: dead columns must be ascending and in [0, L)");
  if (m.scalar_type() == at::kFloat) return auxk_rows<float>(m, be.data_ptr<float>(), dp, dc.numel(), k_aux);
  return auxk_rows<c10::BFloat16>(m, be.data_ptr<float>(), dp, dc.numel(), k_aux);
}

// g = e + e_hat for one row: e_hat = sum over the row's pairs of v W_dec[c] (AuxK's decode of the residual
// x - x_hat = -e, so g is its reconstruction error), into out [D].
void auxk_error_row(const float* e, const int64_t* cols, const float* vals, int64_t n, const float* W, int64_t D,
                    float* out) {
  std::memcpy(out, e, D * sizeof(float));
  for (int64_t s = 0; s < n; ++s) {
    const float* w = W + cols[s] * D;
    const float v = vals[s];
    int64_t d = 0;
    for (; d + VN <= D; d += VN) storen(out + d, loadn(out + d) + v * loadn(w + d));
    for (; d < D; ++d) out[d] += v * w[d];
  }
}

void check_auxk_pairs(const torch::Tensor& crow, const torch::Tensor& cols, const torch::Tensor& vals,
                      const torch::Tensor& W_dec, const torch::Tensor& e) {
  TORCH_CHECK(crow.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && vals.scalar_type() == at::kFloat &&
                  W_dec.scalar_type() == at::kFloat && e.scalar_type() == at::kFloat,
              "auxk: long offsets / columns and fp32 tensors are needed");
  TORCH_CHECK(e.dim() == 2 && e.stride(1) == 1 && crow.numel() == e.size(0) + 1 && cols.numel() == vals.numel() &&
                  W_dec.dim() == 2 && W_dec.size(1) == e.size(1), "auxk: shapes do not match");
}

// crow / cols / vals from auxk_select, W_dec fp32 [L, D], e = x_hat - x fp32 [B, D] (rows may be strided)
// -> fp64 [] sum over rows with pairs of ||e + e_hat||^2 - ||e||^2 (rows without pairs have e_hat = 0): the
// caller's mean ||e_hat - (x - x_hat)||^2 is ||e||^2's mean plus this over B.
torch::Tensor auxk_forward(torch::Tensor crow, torch::Tensor cols, torch::Tensor vals, torch::Tensor W_dec,
                           torch::Tensor e) {
  check_auxk_pairs(crow, cols, vals, W_dec, e);
  auto cc = crow.contiguous(), ic = cols.contiguous(), vc = vals.contiguous(), W = W_dec.contiguous();
  const int64_t B = e.size(0), D = e.size(1), es = e.stride(0);
  const int64_t* cr = cc.data_ptr<int64_t>();
  const float* ep = e.data_ptr<float>();
  std::vector<double> delta(B, 0.0);
  at::parallel_for(0, B, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> g(D);
    for (int64_t r = lo; r < hi; ++r) {
      if (cr[r + 1] == cr[r]) continue;
      auxk_error_row(ep + r * es, ic.data_ptr<int64_t>() + cr[r], vc.data_ptr<float>() + cr[r], cr[r + 1] - cr[r],
                     W.data_ptr<float>(), D, g.data());
      delta[r] = double(dot(g.data(), g.data(), D)) - double(dot(ep + r * es, ep + r * es, D));
    }
  });
  auto out = torch::zeros({}, e.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t r = 0; r < B; ++r) *o += delta[r];  // row order: thread-count independent
  return out;
}

// ||r||^2, or ||r - <r, w> w||^2 with w given, in fp64 (the gradient clip's norms, train/optim.py).
double row_sq(const float* r, const float* w, int64_t D) {
  double rw = 0, s = 0;
  if (w != nullptr)
    for (int64_t d = 0; d < D; ++d) rw += double(r[d]) * w[d];
  for (int64_t d = 0; d < D; ++d) {
    const double t = r[d] - (w != nullptr ? rw * w[d] : 0.0);
    s += t * t;
  }
  return s;
}

// AuxK's gradients added in place into the fused backward's outputs. With g[r] = scale (e[r] + e_hat[r])
// (d aux / d e_hat) and, per pair (r, c, v), da = <g[r], W_dec[c]>: dW_dec[c] += v g[r], dW_enc^T[c] += da
// (x[r] - b_dec), db_enc[c] += da, and (d_x given, numel > 0) d_x[r] += da W_enc[:, c]. sq fp64 [2] gets the
// change of sum_c ||dW_dec[c] projected off W_dec[c]||^2 and of ||dW_enc||^2 over the touched latents, so the
// clip's norms stay exact. -> W_enc db_enc_aux fp32 [D] (the caller subtracts it from db_dec).
torch::Tensor auxk_backward_(torch::Tensor crow, torch::Tensor cols, torch::Tensor vals, torch::Tensor W_dec,
                             torch::Tensor e, double scale, torch::Tensor x, torch::Tensor b_dec, torch::Tensor W_encT,
                             torch::Tensor d_W_dec, torch::Tensor d_W_encT, torch::Tensor d_b_enc, torch::Tensor sq,
                             torch::Tensor d_x) {
  check_auxk_pairs(crow, cols, vals, W_dec, e);
  const int64_t B = e.size(0), D = e.size(1), L = W_dec.size(0), es = e.stride(0);
  for (const torch::Tensor* t : {&x, &b_dec, &W_encT, &d_W_dec, &d_W_encT, &d_b_enc})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "auxk_backward_: contiguous fp32 tensors are needed");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == D && b_dec.numel() == D && W_encT.sizes() == W_dec.sizes() &&
                  d_W_dec.sizes() == W_dec.sizes() && d_W_encT.sizes() == W_dec.sizes() && d_b_enc.numel() == L,
              "auxk_backward_: shapes do not match");
  TORCH_CHECK(sq.scalar_type() == at::kDouble && sq.numel() == 2, "auxk_backward_: sq must be fp64 [2]");
  TORCH_CHECK(d_x.numel() == 0 || (d_x.scalar_type() == at::kFloat && d_x.is_contiguous() && d_x.sizes() == x.sizes()),
              "auxk_backward_: d_x must be empty or contiguous fp32 [B, D]");
  auto cc = crow.contiguous(), ic = cols.contiguous(), vc = vals.contiguous(), W = W_dec.contiguous();
  const int64_t* cr = cc.data_ptr<int64_t>();
  const int64_t* cp = ic.data_ptr<int64_t>();
  const float* vp = vc.data_ptr<float>();
  const float *ep = e.data_ptr<float>(), *Wp = W.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *bd = b_dec.data_ptr<float>(), *WeT = W_encT.data_ptr<float>();
  const int64_t N = ic.numel();
  // g per row that has pairs (compact), and da per pair.
  std::vector<int64_t> slot(B, -1), rows_with;
  for (int64_t r = 0; r < B; ++r)
    if (cr[r + 1] > cr[r]) {
      slot[r] = static_cast<int64_t>(rows_with.size());
      rows_with.push_back(r);
    }
  const int64_t R = static_cast<int64_t>(rows_with.size());
  std::vector<float> g(R * D), da(N);
  // One thread: a few thousand pairs. Split over 2 threads with at::parallel_for the call took 1.17 ms instead
  // of 0.59 replayed in isolation (layer 8, d_sae 4096, 1,777 pairs in 742 rows, 45 latents; not analysed
  // further), and inside the training step both took ~1 ms (0.95-1.06 vs 1.02-1.13 ms, 2 runs each): there its
  // rows of x, e and the gradients come from memory, the fused backward having just streamed 20 MB.
  const float sc = scale;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t r = rows_with[i];
    float* gi = g.data() + i * D;
    auxk_error_row(ep + r * es, cp + cr[r], vp + cr[r], cr[r + 1] - cr[r], Wp, D, gi);
    for (int64_t d = 0; d < D; ++d) gi[d] *= sc;
    for (int64_t s = cr[r]; s < cr[r + 1]; ++s) da[s] = dot(gi, Wp + cp[s] * D, D);
  }
  if (d_x.numel() > 0) {
    float* dxp = d_x.data_ptr<float>();
    for (int64_t r : rows_with)
      for (int64_t s = cr[r]; s < cr[r + 1]; ++s)
        for (int64_t d = 0; d < D; ++d) dxp[r * D + d] += da[s] * WeT[cp[s] * D + d];
  }
  // The pairs grouped by latent (rows ascending within one), then latent by latent in latent order (the
  // sums below: thread-count independent).
  std::vector<int64_t> order(N), row_of(N);
  for (int64_t n = 0; n < N; ++n) order[n] = n;
  std::stable_sort(order.begin(), order.end(), [cp](int64_t a, int64_t b) { return cp[a] < cp[b]; });
  for (int64_t r = 0; r < B; ++r)
    for (int64_t s = cr[r]; s < cr[r + 1]; ++s) row_of[s] = r;
  float *gdec = d_W_dec.data_ptr<float>(), *genc = d_W_encT.data_ptr<float>(), *gbe = d_b_enc.data_ptr<float>();
  auto w_db = torch::zeros({D}, x.options());
  float* wd = w_db.data_ptr<float>();
  double* sqp = sq.data_ptr<double>();
  for (int64_t u0 = 0; u0 < N;) {
    const int64_t c = cp[order[u0]];
    int64_t u1 = u0;
    while (u1 < N && cp[order[u1]] == c) ++u1;
    float* rd = gdec + c * D;
    float* re = genc + c * D;
    const double old_dec = row_sq(rd, Wp + c * D, D), old_enc = row_sq(re, nullptr, D);
    float b = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = order[u], r = row_of[n];
      const float* gr = g.data() + slot[r] * D;
      const float* xr = xp + r * D;
      const float v = vp[n], a = da[n];
      for (int64_t d = 0; d < D; ++d) {
        rd[d] += v * gr[d];
        re[d] += a * (xr[d] - bd[d]);
      }
      b += a;
    }
    gbe[c] += b;
    for (int64_t d = 0; d < D; ++d) wd[d] += b * WeT[c * D + d];
    sqp[0] += row_sq(rd, Wp + c * D, D) - old_dec;
    sqp[1] += row_sq(re, nullptr, D) - old_enc;
    u0 = u1;
  }
  return w_db;
}

// ---- LM-head statistics for spliced evaluation (saestrata.evaluate.branch.head_stats) ----

// exp of VN floats (Cephes expf: 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2; relative error ~1e-7),
// in plain vector arithmetic so that it stays in registers. Inputs below -87.3 give ~1e-38, not 0.
inline vn expn(vn x) {
  typedef int32_t vin __attribute__((vector_size(sizeof(vn))));
  const vn lo = vn{} - 87.3f, hi = vn{} + 88.7f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vn magic = vn{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  vn n = (x * 1.44269504088896341f + magic) - magic;
  vn r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vn p = vn{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vin bits = (__builtin_convertvector(n, vin) + 127) << 23;
  vn scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double hsum(vn a) {
  double s = 0;
  for (int j = 0; j < VN; ++j) s += a[j];
  return s;
}

template <typename scalar_t>
inline vn loadn(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return loadn(static_cast<const float*>(p));
  } else {
    vn v;
    for (int j = 0; j < VN; ++j) v[j] = to_float(p[j]);
    return v;
  }
}

template <typename scalar_t>
float row_max(const scalar_t* z, int64_t W) {
  vn mv = vn{} - std::numeric_limits<float>::infinity();
  int64_t v = 0;
  for (; v + VN <= W; v += VN) {
    vn x = loadn(z + v);
    mv = x > mv ? x : mv;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < VN; ++j) m = std::max(m, mv[j]);
  for (; v < W; ++v) m = std::max(m, to_float(z[v]));
  return m;
}

// Per position p of z [U, P, W] (U groups, group 0 clean): m[u, p] = max_v z, s[u, p] = sum_v exp(z - m),
// d[0, p] = sum_v e0_v z0_v and d[u, p] = sum_v e0_v (z0_v - zu_v) for u >= 1, with e0 = exp(z0 - m0).
// One pass for the maxima and one for the rest per row, each row in L1/L2 (torch's ops make ~8 passes over
// the whole block through memory). Sums are float per lane over <= 256 columns, then double.
template <typename scalar_t>
void head_stats_rows(const scalar_t* z, int64_t U, int64_t P, int64_t W, float* m, double* s, double* d) {
  at::parallel_for(0, P, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> e0(W);
    for (int64_t p = lo; p < hi; ++p) {
      const scalar_t* z0 = z + p * W;
      const float m0 = row_max(z0, W);
      const vn m0v = vn{} + m0;
      double s0 = 0, d0 = 0;
      int64_t v = 0;
      while (v + VN <= W) {  // float lane sums over <= 256 columns, then double
        vn sa = {}, da = {};
        for (const int64_t end = std::min(W - W % VN, v + 256); v < end; v += VN) {
          vn x = loadn(z0 + v), e = expn(x - m0v);
          storen(e0.data() + v, e);
          sa += e;
          da += e * x;
        }
        s0 += hsum(sa);
        d0 += hsum(da);
      }
      for (; v < W; ++v) {
        float x = to_float(z0[v]), e = std::exp(x - m0);
        e0[v] = e;
        s0 += e;
        d0 += static_cast<double>(e) * x;
      }
      m[p] = m0;
      s[p] = s0;
      d[p] = d0;
      for (int64_t u = 1; u < U; ++u) {
        const scalar_t* zu = z + (u * P + p) * W;
        const float mu = row_max(zu, W);
        const vn muv = vn{} + mu;
        double su = 0, du = 0;
        v = 0;
        while (v + VN <= W) {
          vn sa = {}, da = {};
          for (const int64_t end = std::min(W - W % VN, v + 256); v < end; v += VN) {
            vn x = loadn(zu + v);
            sa += expn(x - muv);
            da += loadn(e0.data() + v) * (loadn(z0 + v) - x);
          }
          su += hsum(sa);
          du += hsum(da);
        }
        for (; v < W; ++v) {
          float x = to_float(zu[v]);
          su += std::exp(x - mu);
          du += static_cast<double>(e0[v]) * (to_float(z0[v]) - x);
        }
        m[u * P + p] = mu;
        s[u * P + p] = su;
        d[u * P + p] = du;
      }
    }
  });
}

std::vector<torch::Tensor> head_block_stats(torch::Tensor z) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 3, "head_block_stats: a CPU [groups, positions, columns] tensor is needed");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16,
              "head_block_stats: float32 or bfloat16 logits are needed");
  auto zc = z.contiguous();
  const int64_t U = zc.size(0), P = zc.size(1), W = zc.size(2);
  TORCH_CHECK(U >= 1 && W >= 1, "head_block_stats: at least one group and one column are needed");
  auto m = torch::empty({U, P}, zc.options().dtype(at::kFloat));
  auto s = torch::empty({U, P}, zc.options().dtype(at::kDouble));
  auto d = torch::empty({U, P}, zc.options().dtype(at::kDouble));
  if (zc.scalar_type() == at::kFloat)
    head_stats_rows<float>(zc.data_ptr<float>(), U, P, W, m.data_ptr<float>(), s.data_ptr<double>(), d.data_ptr<double>());
  else
    head_stats_rows<c10::BFloat16>(zc.data_ptr<c10::BFloat16>(), U, P, W, m.data_ptr<float>(), s.data_ptr<double>(),
                                   d.data_ptr<double>());
  return {m, s, d};
}

// ---- The co-activation Gram of a sparse code (saestrata.train.sparse_gram) -------------------------
// G = f^T f of a code f [B, L] from its non-zeros: G[p, q] = sum_b f[b, p] f[b, q] needs only the products of
// two non-zeros of one row, sum_b n_b^2 of them (~0.9M at B 1024, L0 ~28) against the dense matmul's B L^2
// (4.3G at L 2048), and its backward dL/df[b, p] = sum_q (dG[p, q] + dG[q, p]) f[b, q] only the non-zeros
// (seed 001's Eq. 4 and seed 000's eq. 4 on a ReLU code, whose zeros get no gradient through the ReLU).
// Threads own rows of G (latents p), each walking the batch rows that contain p (a column index built
// here), so no two threads add into one entry and the sums run in batch-row order on every run.
// divisor > 0: also sq = (G / divisor)^2 (seed 001's Eq. 4 reads only that), each row squared by the thread that
// summed it while the row is in its cache, instead of two torch passes over [L, L] (a division, a square).
std::vector<torch::Tensor> code_gram_impl(torch::Tensor f, int64_t max_pairs, double divisor) {
  TORCH_CHECK(f.scalar_type() == at::kFloat && f.dim() == 2 && f.is_contiguous(),
              "code_gram: a contiguous 2-D float32 code is needed");
  const int64_t B = f.size(0), L = f.size(1);
  const float* fp = f.data_ptr<float>();
  auto crow = torch::empty({B + 1}, f.options().dtype(at::kLong));
  int64_t* cr = crow.data_ptr<int64_t>();
  cr[0] = 0;
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t n = 0;
      for (int64_t c = 0; c < L; ++c) n += fp[b * L + c] != 0.0f;
      cr[b + 1] = n;
    }
  });
  int64_t pairs = 0;
  for (int64_t b = 0; b < B; ++b) {
    pairs += cr[b + 1] * cr[b + 1];
    cr[b + 1] += cr[b];
  }
  if (pairs > max_pairs) return {};
  const int64_t N = cr[B];
  auto cols = torch::empty({N}, crow.options());
  auto vals = torch::empty({N}, f.options());
  int64_t* cp = cols.data_ptr<int64_t>();
  float* vp = vals.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t n = cr[b];
      for (int64_t c = 0; c < L; ++c) {
        const float v = fp[b * L + c];
        if (v != 0.0f) { cp[n] = c; vp[n] = v; ++n; }
      }
    }
  });
  // column index: for each latent, its non-zeros (as positions n) in batch-row order (a counting sort)
  std::vector<int64_t> cstart(L + 1, 0), at_n(N);
  for (int64_t n = 0; n < N; ++n) ++cstart[cp[n] + 1];
  for (int64_t c = 0; c < L; ++c) cstart[c + 1] += cstart[c];
  std::vector<int64_t> fill(cstart.begin(), cstart.end() - 1);
  std::vector<int64_t> row_of(N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = cr[b]; n < cr[b + 1]; ++n) { at_n[fill[cp[n]]++] = n; row_of[n] = b; }
  auto gram = torch::zeros({L, L}, f.options());
  float* gp = gram.data_ptr<float>();
  const bool square = divisor > 0;
  auto sq = square ? torch::empty({L, L}, f.options()) : torch::Tensor();
  float* sp = square ? sq.data_ptr<float>() : nullptr;
  const float div = static_cast<float>(divisor);
  at::parallel_for(0, L, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      float* g = gp + p * L;
      for (int64_t t = cstart[p]; t < cstart[p + 1]; ++t) {
        const int64_t n = at_n[t], b = row_of[n];
        const float v = vp[n];
        for (int64_t m = cr[b]; m < cr[b + 1]; ++m) g[cp[m]] += v * vp[m];
      }
      if (square)
        for (int64_t q = 0; q < L; ++q) {
          const float t = g[q] / div;  // as torch's (G / divisor).pow(2): a division, then t * t
          sp[p * L + q] = t * t;
        }
    }
  });
  if (square) return {gram, crow, cols, vals, sq};
  return {gram, crow, cols, vals};
}

std::vector<torch::Tensor> code_gram(torch::Tensor f, int64_t max_pairs) { return code_gram_impl(f, max_pairs, 0.0); }

// code_gram and (G / divisor)^2: (gram, crow, cols, vals, sq), [] past max_pairs.
std::vector<torch::Tensor> code_gram_sq(torch::Tensor f, int64_t max_pairs, double divisor) {
  TORCH_CHECK(divisor > 0, "code_gram_sq: the divisor must be positive");
  return code_gram_impl(f, max_pairs, divisor);
}

// d f at the code's non-zeros: df[b, p] = sum_q (dG(p, q) + dG(q, p)) f[b, q], dG(p, q) the gradient of G[p, q].
template <typename DG>
torch::Tensor gram_backward_at_nonzeros(DG dG, int64_t L, const torch::Tensor& crow, const torch::Tensor& cols,
                                        const torch::Tensor& vals) {
  const int64_t B = crow.numel() - 1;
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  const float* vp = vals.data_ptr<float>();
  auto df = torch::zeros({B, L}, vals.options());
  float* dp = df.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      for (int64_t n = cr[b]; n < cr[b + 1]; ++n) {
        const int64_t p = cp[n];
        float acc = 0.0f;
        for (int64_t m = cr[b]; m < cr[b + 1]; ++m) acc += (dG(p, cp[m]) + dG(cp[m], p)) * vp[m];
        dp[b * L + p] = acc;
      }
    }
  });
  return df;
}

// d f at the code's non-zeros from dG [L, L] (code_gram).
torch::Tensor code_gram_backward(torch::Tensor dgram, torch::Tensor crow, torch::Tensor cols, torch::Tensor vals) {
  TORCH_CHECK(dgram.scalar_type() == at::kFloat && vals.scalar_type() == at::kFloat, "code_gram_backward: float32 is needed");
  auto dg = dgram.contiguous();
  const int64_t L = dg.size(0);
  const float* gp = dg.data_ptr<float>();
  return gram_backward_at_nonzeros([gp, L](int64_t p, int64_t q) { return gp[p * L + q]; }, L, crow, cols, vals);
}

// d f at the code's non-zeros from dsq [L, L], the gradient of sq = (G / divisor)^2 (code_gram_sq): dG = dsq * (2 *
// (G / divisor)) / divisor, formed only at the entries the non-zeros read, in torch's order of the square's and the
// division's backward (the dense [L, L] dG is never written).
torch::Tensor code_gram_sq_backward(torch::Tensor dsq, torch::Tensor gram, double divisor, torch::Tensor crow,
                                    torch::Tensor cols, torch::Tensor vals) {
  TORCH_CHECK(dsq.scalar_type() == at::kFloat && gram.scalar_type() == at::kFloat && vals.scalar_type() == at::kFloat,
              "code_gram_sq_backward: float32 is needed");
  TORCH_CHECK(dsq.sizes() == gram.sizes() && divisor > 0, "code_gram_sq_backward: shapes or divisor do not match");
  auto ds = dsq.contiguous(), gc = gram.contiguous();
  const int64_t L = gc.size(0);
  const float* dp = ds.data_ptr<float>();
  const float* gp = gc.data_ptr<float>();
  const float div = static_cast<float>(divisor);
  auto dG = [dp, gp, L, div](int64_t p, int64_t q) { return dp[p * L + q] * (2.0f * (gp[p * L + q] / div)) / div; };
  return gram_backward_at_nonzeros(dG, L, crow, cols, vals);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rowwise_topk", &rowwise_topk, "Per-row top-k of a 2-D CPU tensor (values, indices), ties to the lower index");
  m.def("batch_topk_select", &batch_topk_select, "The n largest positive entries of mm + b_enc over a batch (rows, cols, values)");
  m.def("sampled_dot", &sampled_dot, "out[n] = <g[bags[n]], w[cols[n]]> (fp32, CPU)");
  m.def("topk_fused_forward", &topk_fused_forward, "TopK SAE forward: top-k of mm + b_enc, x_hat and its error (CPU)");
  m.def("topk_fused_backward", &topk_fused_backward, "TopK SAE backward from x_hat - x (CPU), with gradient norms");
  m.def("pairs_fused_forward", &pairs_fused_forward, "Fused SAE forward on given row-sorted pairs: x_hat and its error (CPU)");
  m.def("nested_fused_forward", &nested_fused_forward, "Matryoshka: the prefixes' errors' suffix sums, squared norms and the pairs' de (CPU)");
  m.def("nested_fused_grads", &nested_fused_grads, "Matryoshka: per-bag decode gradients (suffix sums) and the pairs' dv (CPU)");
  m.def("pairs_fused_backward", &pairs_fused_backward, "Fused SAE backward on given pairs (CPU), with gradient norms");
  m.def("auxk_select", &auxk_select, "AuxK: per row the k_aux largest positive pre-activations of the dead columns (crow, cols, vals)");
  m.def("auxk_forward", &auxk_forward, "AuxK: sum over rows of ||e + e_hat||^2 - ||e||^2 from its pairs (fp64)");
  m.def("auxk_backward_", &auxk_backward_, "AuxK: its pairs' gradients added in place, with the clip's norms (CPU)");
  m.def("normalize_rows_", &normalize_rows_, "w[r] /= max(||w[r]||, eps) in place (fp32, CPU)");
  m.def("remove_parallel_", &remove_parallel_, "grad[r] -= <grad[r], w[r]> w[r] in place (fp32, CPU)");
  m.def("projected_row_sq_norms", &projected_row_sq_norms, "||g[r] - <g[r], w[r]> w[r]||^2 per row (fp64 out)");
  m.def("head_block_stats", &head_block_stats, "Per-position max, sum of exp and clean-weighted logit differences of [U, P, W] logits");
  m.def("code_gram", &code_gram, "f^T f of a [B, L] fp32 code from its non-zeros (gram, crow, cols, vals), [] past max_pairs");
  m.def("code_gram_backward", &code_gram_backward, "d f at the code's non-zeros from d(f^T f) (fp32, CPU)");
  m.def("code_gram_sq", &code_gram_sq, "code_gram and (f^T f / divisor)^2: (gram, crow, cols, vals, sq), [] past max_pairs");
  m.def("code_gram_sq_backward", &code_gram_sq_backward, "d f at the code's non-zeros from d((f^T f / divisor)^2) (fp32, CPU)");
  m.def("adam_unit_rows_", &adam_unit_rows_, "Adam step with projected gradient and row renormalisation (fp32, CPU)");
}
