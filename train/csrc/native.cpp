// Compiled CPU kernels of saestrata.train.native: a per-row top-k of a [rows, n] tensor (float32 or
// bfloat16), the sampled dot products of the sparse decoder's backward, and the decoder-gradient
// projection of unit-norm-decoder SAEs. Tried and dropped (2 threads, idle, 32k pairs, D 640): a
// per-latent weighted row sum in place of embedding_bag (1.52 vs 1.49 ms; 1.29 vs 0.89 ms as decode).
//
// Why: torch's CPU topk costs ~0.5x of a TopK SAE step's encoder matmul at d_sae 4096, k 32
// (docs/results/bench/README.md, issue 14). Here each row is one pass: a block of 16 values is
// skipped when its maximum does not beat the current k-th largest (almost every block once the
// threshold has settled), the rest go through a size-k min-heap. Expected heap insertions per row
// are about k ln(n / k).
//
// Ties: of equal values the lower column index wins (a deterministic rule; torch's topk leaves it
// unspecified). Output per row: the k columns in ascending column order and their values.
// NaN ranks below every number (callers reject NaN activations; this only keeps the kernel safe).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
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

// Greater-first order with the tie rule: larger value first, then the lower column.
struct Cand {
  float v;
  int64_t i;
};
inline bool wins(const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

// One row: the maxima of k or more disjoint blocks of columns bound the k-th largest value from
// below (the k largest maxima are k values of the row), so every winner is >= that bound; only the
// entries at or above it (about k of them for i.i.d. columns) are candidates. Block b holds the
// columns b, b + nb, b + 2 nb, ... (span of them, nb = n / span), so the maxima are a vertical,
// vectorized max. span = n / (4 k), at most 32: measured on real layer-8 pre-activations (d_sae 4096,
// k 32, 1 thread) spans 8 / 16 / 32 / 64 / 128 took 8.1 / 7.1 / 5.5 / 5.7 / 8.2 ms per 1024 rows
// (~34 candidates per row at 16).
template <typename scalar_t>
void topk_row(const scalar_t* row, int64_t n, int64_t k, std::vector<float>& maxima, std::vector<Cand>& cand,
              scalar_t* out_v, int64_t* out_i) {
  const int64_t span = std::min<int64_t>(32, n / (4 * k));
  const int64_t nb = span > 0 ? n / span : 0;
  float tau = -std::numeric_limits<float>::infinity();
  if (span >= 2 && nb >= k) {
    maxima.resize(nb);
    float* mx = maxima.data();
    for (int64_t b = 0; b < nb; ++b) mx[b] = to_float(row[b]);
    for (int64_t s = 1; s < span; ++s) {
      const scalar_t* p = row + s * nb;
      for (int64_t b = 0; b < nb; ++b) {
        float x = to_float(p[b]);
        mx[b] = x > mx[b] ? x : mx[b];
      }
    }
    std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<float>());
    tau = maxima[k - 1];
  }
  cand.clear();
  constexpr int64_t CHUNK = 32;
  int64_t j = 0;
  for (; j + CHUNK <= n; j += CHUNK) {
    int hit = 0;
    for (int64_t t = 0; t < CHUNK; ++t) hit |= to_float(row[j + t]) >= tau;
    if (!hit) continue;
    for (int64_t t = 0; t < CHUNK; ++t) {
      float x = to_float(row[j + t]);
      if (x >= tau) cand.push_back({x, j + t});
    }
  }
  for (; j < n; ++j) {
    float x = to_float(row[j]);
    if (x >= tau) cand.push_back({x, j});
  }
  if (static_cast<int64_t>(cand.size()) < k) {  // only with NaN in the row (NaN >= tau is false): NaN ranks lowest
    cand.clear();
    for (int64_t c = 0; c < n; ++c) {
      float x = to_float(row[c]);
      cand.push_back({x == x ? x : -std::numeric_limits<float>::infinity(), c});
    }
  }
  if (static_cast<int64_t>(cand.size()) > k) {
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), wins);
    cand.resize(k);
    std::sort(cand.begin(), cand.end(), [](const Cand& a, const Cand& b) { return a.i < b.i; });
  }
  for (int64_t t = 0; t < k; ++t) {
    out_i[t] = cand[t].i;
    out_v[t] = row[cand[t].i];  // the input's own value, bit-exact in its dtype
  }
}

template <typename scalar_t>
void topk_rows(const torch::Tensor& xc, int64_t k, torch::Tensor& values, torch::Tensor& indices) {
  const int64_t rows = xc.size(0), n = xc.size(1);
  const scalar_t* src = xc.data_ptr<scalar_t>();
  scalar_t* vout = values.data_ptr<scalar_t>();
  int64_t* iout = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> maxima;  // per thread, reused across its rows
    std::vector<Cand> cand;
    cand.reserve(4 * k);
    for (int64_t r = lo; r < hi; ++r) topk_row<scalar_t>(src + r * n, n, k, maxima, cand, vout + r * k, iout + r * k);
  });
}

std::vector<torch::Tensor> rowwise_topk(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "rowwise_topk: a CPU tensor is needed");
  TORCH_CHECK(x.dim() == 2, "rowwise_topk: a 2-D [rows, n] tensor is needed");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "rowwise_topk: k must be in [1, n]");
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

// grad[r] -= <grad[r], w[r]> w[r] for each row r of fp32 [rows, d] tensors, in one pass over both
// (torch's expression makes three [rows, d] temporaries). 16 partial sums keep the dot vectorized.
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
      float acc[16] = {0};
      int64_t j = 0;
      for (; j + 16 <= d; j += 16)
        for (int t = 0; t < 16; ++t) acc[t] += gr[j + t] * wr[j + t];
      float dot = 0;
      for (int t = 0; t < 16; ++t) dot += acc[t];
      for (; j < d; ++j) dot += gr[j] * wr[j];
      for (int64_t c = 0; c < d; ++c) gr[c] -= dot * wr[c];
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
      const float* a = gp + bp[n] * D;
      const float* b = wp + cp[n] * D;
      float acc[16] = {0};
      int64_t d = 0;
      for (; d + 16 <= D; d += 16)
        for (int t = 0; t < 16; ++t) acc[t] += a[d + t] * b[d + t];
      float s = 0;
      for (int t = 0; t < 16; ++t) s += acc[t];
      for (; d < D; ++d) s += a[d] * b[d];
      op[n] = s;
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rowwise_topk", &rowwise_topk, "Per-row top-k of a 2-D CPU tensor (values, indices), ties to the lower index");
  m.def("sampled_dot", &sampled_dot, "out[n] = <g[bags[n]], w[cols[n]]> (fp32, CPU)");
  m.def("remove_parallel_", &remove_parallel_, "grad[r] -= <grad[r], w[r]> w[r] in place (fp32, CPU)");
}
