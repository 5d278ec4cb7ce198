#include "kvscope/opt/cpu/ragged.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "instantiate.hpp"
#include "qk_blocks.hpp"
#include "simd.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt::cpu {
namespace {

/// Raw bits of a storage type and the bits of its +infinity.
template <class S>
struct StorageBits {
  using U = std::uint16_t;
  static constexpr U kInf = std::is_same_v<S, f16> ? 0x7c00 : 0x7f80;
};
template <>
struct StorageBits<float> {
  using U = std::uint32_t;
  static constexpr U kInf = 0x7f800000u;
};

/// Whether from_f32<S>(0 + 1 * x) == x bit for bit on every element: true
/// unless the row holds -0 (the sum makes it +0) or a NaN (re-quieted).
template <class S>
bool copy_is_exact(const S* row, int d) {
  using U = typename StorageBits<S>::U;
  constexpr U kSign = static_cast<U>(U{1} << (8 * sizeof(U) - 1));
  // An integer OR over the whole row (no early exit) so it vectorises.
  U changed = 0;
#pragma omp simd reduction(| : changed)
  for (int i = 0; i < d; ++i) {
    U b;
    std::memcpy(&b, row + i, sizeof b);
    changed |= static_cast<U>((b == kSign) | (static_cast<U>(b & ~kSign) > StorageBits<S>::kInf));
  }
  return changed == 0;
}

/// Rows [first, first + n) of x as fp32: x itself for fp32 storage, else converted into buf.
template <class S>
const float* rows_f32(const S* x, std::int64_t first, std::int64_t n, int d, float* buf) {
  if constexpr (std::is_same_v<S, float>) {
    return x + first * d;
  } else {
    load_row(x + first * d, n * d, buf);
    return buf;
  }
}

/// Per-thread rows for apply_ragged_plan: fp32 accumulator and source row, and
/// the rounded output row on its way to a streaming store.
template <class S>
struct GatherScratch {
  std::vector<float> acc, row;
  std::vector<S> out;
  explicit GatherScratch(int d)
      : acc(static_cast<std::size_t>(d)), row(static_cast<std::size_t>(d)), out(static_cast<std::size_t>(d)) {}
};

/// Rows a thread of apply_ragged_plan hints ahead: a plan's source rows are
/// scattered (no hardware prefetcher follows them), and ~8 rows of K and V
/// in flight cover the DRAM latency at a thread's share of the bandwidth.
constexpr std::int64_t kRowsAhead = 8;

/// The kv head whose slots hold plan row r.
std::int64_t head_of_row(const RaggedPlan& p, std::int64_t r) {
  return std::upper_bound(p.offsets, p.offsets + p.heads + 1, r) - p.offsets - 1;
}

/// Hints the K and V rows row r reads.
template <class S>
void prefetch_sources(const RaggedPlan& p, std::int64_t r, const S* k, const S* v, std::int64_t head_elems, int d) {
  const std::int64_t h = head_of_row(p, r);
  const std::size_t bytes = static_cast<std::size_t>(d) * sizeof(S);
  for (std::int64_t e = p.row_ptr[r]; e < p.row_ptr[r + 1]; ++e) {
    const std::int64_t at = h * head_elems + p.token[e] * d;
    prefetch(k + at, bytes);
    prefetch(v + at, bytes);
  }
}

/// out = sum_e coef[e] * x[token[e]] over plan row r's entries, then re-rotated
/// by `rotate` positions (0: none), rounded once to S.
template <class S>
void weighted_row(const RaggedPlan& p, std::int64_t r, const float* coef, const S* x, int d, std::int64_t rotate,
                  GatherScratch<S>& s, S* out) {
  const std::int64_t e0 = p.row_ptr[r], e1 = p.row_ptr[r + 1];
  // A kept token (one entry of weight 1, not moved) copies its storage bits,
  // exactly what the accumulation below would round back to.
  const std::size_t bytes = static_cast<std::size_t>(d) * sizeof(S);
  if (rotate == 0 && e1 == e0 + 1 && coef[e0] == 1.0f && copy_is_exact(x + p.token[e0] * d, d)) {
    stream_copy(out, x + p.token[e0] * d, bytes);
    return;
  }
  float* acc = s.acc.data();
  std::fill(acc, acc + d, 0.0f);
  for (std::int64_t e = e0; e < e1; ++e) {
    const float c = coef[e];
    if (c == 0.0f) continue;
    const float* row = rows_f32(x, p.token[e], 1, d, s.row.data());
#pragma omp simd
    for (int i = 0; i < d; ++i) acc[i] += c * row[i];
  }
  if (rotate != 0)
    for (int i = 0; i < d / 2; ++i)
      math::rope_rotate_pair(acc[i], acc[i + d / 2], i, d, static_cast<double>(rotate), p.rope_theta);
  store_row(acc, d, s.out.data());
  stream_copy(out, s.out.data(), bytes);
}

}  // namespace

template <class S>
void apply_ragged_plan(const RaggedPlan& plan, const S* k, const S* v, std::int64_t tokens, int head_dim, S* k_out,
                       S* v_out) {
  const int d = head_dim;
  const std::int64_t rows = plan.offsets[plan.heads];
  // One parallel loop over every head's rows: no barrier per head.
  // K'/V' are written with streaming stores (each thread fences its own
  // before the region's closing barrier).
#pragma omp parallel
  {
    GatherScratch<S> s(d);
#pragma omp for schedule(static) nowait
    for (std::int64_t r = 0; r < rows; ++r) {
      if (r + kRowsAhead < rows) prefetch_sources(plan, r + kRowsAhead, k, v, tokens * d, d);
      const std::int64_t h = head_of_row(plan, r);
      const std::int64_t rotate = plan.rotate != nullptr ? plan.rotate[r] : 0;
      weighted_row(plan, r, plan.coef_k, k + h * tokens * d, d, rotate, s, k_out + r * d);
      weighted_row(plan, r, plan.coef_v, v + h * tokens * d, d, 0, s, v_out + r * d);
    }
    stream_fence();
  }
}

namespace {

// decode_attention splits each kv head's slots into chunks of kChunk (a fixed
// size, so every output's reduction order is the same for any thread count)
// and walks a chunk in blocks of kBlock keys: a block's logits first, then one
// max, rescale and exp pass, then the weighted V rows.
constexpr std::int64_t kChunk = 512;
constexpr int kBlock = 32;

/// Softmax state of one q head over one chunk: running max m, normaliser l,
/// unnormalised output acc (d floats).
struct Partial {
  float m = -INFINITY, l = 0.0f;
  float* acc = nullptr;
};

/// One chunk of one kv head: the slots [first, last) and where its G partials live.
struct Chunk {
  int g = 0;
  std::int64_t first = 0, last = 0;
};

/// out[h * kBlock + j] = q_h . k_j (= dot_qk) for the n keys of storage `keys`
/// and the G q heads of `qs` (pre-scaled, [G, d]). Under AVX2, two keys by
/// four heads at a time, converted in registers (detail::qk_4x2); otherwise
/// (and for an odd last key) each key converted into kbuf first.
/// The rows of the next block (`ahead`: its K rows, then as many V rows at
/// `ahead_v`) are hinted as the keys go (two at a time between the products),
/// not in one burst.
template <class S>
void block_logits(const float* qs, int G, const S* keys, int n, int d, float* kbuf, float* out /* [G, kBlock] */,
                  const S* ahead, const S* ahead_v) {
  int j = 0;
#if KVSCOPE_CPU_AVX2
  if (d % 8 == 0 && G % 4 == 0)
    for (; j + 2 <= n; j += 2) {
      const std::size_t two_rows = 2 * static_cast<std::size_t>(d) * sizeof(S);
      prefetch_block(ahead + static_cast<std::ptrdiff_t>(j) * d, two_rows);
      prefetch_block(ahead_v + static_cast<std::ptrdiff_t>(j) * d, two_rows);
      for (int h = 0; h < G; h += 4)
        detail::qk_4x2(qs + static_cast<std::ptrdiff_t>(h) * d, keys + static_cast<std::ptrdiff_t>(j) * d,
                       keys + static_cast<std::ptrdiff_t>(j + 1) * d, d, out + h * kBlock + j, kBlock);
    }
#endif
  for (; j < n; ++j) {
    const std::size_t row = static_cast<std::size_t>(d) * sizeof(S);
    prefetch_block(ahead + static_cast<std::ptrdiff_t>(j) * d, row);
    prefetch_block(ahead_v + static_cast<std::ptrdiff_t>(j) * d, row);
    load_row(keys + static_cast<std::ptrdiff_t>(j) * d, d, kbuf);
    for (int h = 0; h < G; ++h) out[h * kBlock + j] = detail::dot_qk(qs + static_cast<std::ptrdiff_t>(h) * d, kbuf, d);
  }
}

/// Folds a block of n logits x (bias added) into p: logits become weights
/// exp(x - max), the accumulator is rescaled once if the max moved. The max
/// and the exp-and-sum pass are the softmax's (eight lanes wide; a scalar
/// chain of n dependent maxes and adds was a third of a key's decode time).
void fold_block(Partial& p, float* x, int n, int d) {
  const float mb = std::max(p.m, detail::max_of(x, n));
  if (mb > p.m) {
    const float rescale = p.m == -INFINITY ? 0.0f : std::exp(p.m - mb);
    p.l *= rescale;
#pragma omp simd
    for (int i = 0; i < d; ++i) p.acc[i] *= rescale;
    p.m = mb;
  }
  p.l += detail::exp_shifted_sum(x, n, p.m);
}

/// acc += sum_j w[j] * rows[j] over n rows of d, j in order for every element.
/// Tiles of kTile columns keep kTile / 8 independent register sums per row.
void accumulate_rows(const float* w, const float* rows, int n, int d, float* acc) {
  constexpr int kTile = 32;
  int i0 = 0;
  for (; i0 + kTile <= d; i0 += kTile) {
    float a[kTile];
    std::copy(acc + i0, acc + i0 + kTile, a);
    for (int j = 0; j < n; ++j) {
      const float* r = rows + static_cast<std::ptrdiff_t>(j) * d + i0;
#pragma omp simd
      for (int t = 0; t < kTile; ++t) a[t] += w[j] * r[t];
    }
    std::copy(a, a + kTile, acc + i0);
  }
  for (int j = 0; j < n; ++j)
    for (int i = i0; i < d; ++i) acc[i] += w[j] * rows[static_cast<std::ptrdiff_t>(j) * d + i];
}

#if KVSCOPE_CPU_AVX2
#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_OFF
#endif
/// Columns [i0, i0 + L::kWidth * V) of accumulate_rows4, in lanes L
/// (detail::Lanes8 or Lanes16): the 4 x V register sums stay in registers
/// across the n rows, each row's V vectors converted in registers. Either
/// width does the same fused multiply-adds lane by lane, so the same bits;
/// sixteen lanes take half the instructions, and this VM issues two zmm
/// FMAs a cycle, as many as ymm ones (docs/performance.md, run 18).
template <class L, int V, class S>
void accumulate_tile4(const float* w, const S* rows, int n, int d, int i0, Partial* parts) {
  constexpr int W = L::kWidth;
  typename L::V a[4][V];
  for (int h = 0; h < 4; ++h)
    for (int t = 0; t < V; ++t) a[h][t] = L::loadu(parts[h].acc + i0 + W * t);
  for (int j = 0; j < n; ++j) {
    const S* r = rows + static_cast<std::ptrdiff_t>(j) * d + i0;
    typename L::V x[V];
#pragma GCC unroll 4
    for (int t = 0; t < V; ++t) x[t] = L::load(r + W * t);
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const typename L::V wh = L::set1(w[h * kBlock + j]);
#pragma GCC unroll 4
      for (int t = 0; t < V; ++t) a[h][t] = L::fmadd(wh, x[t], a[h][t]);
    }
  }
  for (int h = 0; h < 4; ++h)
    for (int t = 0; t < V; ++t) L::storeu(parts[h].acc + i0 + W * t, a[h][t]);
}
#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_ON
#endif
#endif

/// accumulate_rows for four heads at once (weights w + h * kBlock, h < 4),
/// over n rows of storage read and converted in registers (no fp32 copy of the
/// V block): each row is loaded once for the four heads. Under AVX-512,
/// sixteen-lane tiles of 64 and 32 columns; under AVX2, eight-lane tiles of
/// 32 columns (a 64-byte line of a 16-bit row; tiles of 16 read each line
/// twice and ran slower than the copy), then 16 and 8. Every element's sum
/// runs over j in the same order with the same fused multiply-adds, so the
/// results are accumulate_rows' bit for bit.
template <class S>
void accumulate_rows4(const float* w, const S* rows, int n, int d, Partial* parts) {
  int i0 = 0;
#if KVSCOPE_CPU_AVX512
  for (; i0 + 64 <= d; i0 += 64) accumulate_tile4<detail::Lanes16, 4>(w, rows, n, d, i0, parts);  // two lines of a 16-bit row
  for (; i0 + 32 <= d; i0 += 32) accumulate_tile4<detail::Lanes16, 2>(w, rows, n, d, i0, parts);
#endif
#if KVSCOPE_CPU_AVX2
  for (; i0 + 32 <= d; i0 += 32) accumulate_tile4<detail::Lanes8, 4>(w, rows, n, d, i0, parts);
  for (; i0 + 16 <= d; i0 += 16) accumulate_tile4<detail::Lanes8, 2>(w, rows, n, d, i0, parts);
  for (; i0 + 8 <= d; i0 += 8) accumulate_tile4<detail::Lanes8, 1>(w, rows, n, d, i0, parts);
#endif
  for (int h = 0; h < 4; ++h)
    for (int j = 0; j < n; ++j)
      for (int i = i0; i < d; ++i)
        parts[h].acc[i] += w[h * kBlock + j] * to_f32(rows[static_cast<std::ptrdiff_t>(j) * d + i]);
}

/// The G partials of chunk c (q heads c.g*G ...), over K'/V' rows.
template <class S>
void attend_chunk(const Chunk& c, const float* qs, int G, int d, const S* k, const S* v, const float* log_bias,
                  Partial* parts, std::vector<float>& kbuf, std::vector<float>& vbuf, std::vector<float>& x) {
  for (std::int64_t j0 = c.first; j0 < c.last; j0 += kBlock) {
    const int n = static_cast<int>(std::min<std::int64_t>(kBlock, c.last - j0));
    // The next block's rows are on their way while this one computes.
    block_logits(qs, G, k + j0 * d, n, d, kbuf.data(), x.data(), k + (j0 + kBlock) * d, v + (j0 + kBlock) * d);
    for (int h = 0; h < G; ++h) {
      float* xh = x.data() + h * kBlock;
      if (log_bias != nullptr)
        for (int j = 0; j < n; ++j) xh[j] += log_bias[j0 + j];
      fold_block(parts[h], xh, n, d);
    }
    // Each head's accumulator stays in registers across the block's rows.
    // Four heads at a time read the V rows from storage (converted in
    // registers); heads left over share one fp32 copy of the block.
    int h = 0;
    for (; h + 4 <= G; h += 4) accumulate_rows4(x.data() + h * kBlock, v + j0 * d, n, d, parts + h);
    if (h < G) {
      const float* vr = rows_f32(v, j0, n, d, vbuf.data());
      for (; h < G; ++h) accumulate_rows(x.data() + h * kBlock, vr, n, d, parts[h].acc);
    }
  }
}

/// Fixed-size chunks of every kv head's slots, in order (an empty head gets one empty chunk).
std::vector<Chunk> make_chunks(int kv_heads, const std::int64_t* offsets) {
  std::vector<Chunk> chunks;
  for (int g = 0; g < kv_heads; ++g) {
    std::int64_t a = offsets[g];
    do {
      const std::int64_t b = std::min(a + kChunk, offsets[g + 1]);
      chunks.push_back({g, a, b});
      a = b;
    } while (a < offsets[g + 1]);
  }
  return chunks;
}

/// out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M) over one q head's
/// partials in chunk order (M = max m_c); 0 for a head without slots.
void merge_partials(const Partial* parts, std::size_t n, std::size_t stride, int d, float* out) {
  float M = -INFINITY;
  for (std::size_t c = 0; c < n; ++c) M = std::max(M, parts[c * stride].m);
  std::fill(out, out + d, 0.0f);
  float l = 0.0f;
  for (std::size_t c = 0; c < n; ++c) {
    const Partial& p = parts[c * stride];
    const float f = p.m == -INFINITY ? 0.0f : std::exp(p.m - M);
    l += p.l * f;
#pragma omp simd
    for (int i = 0; i < d; ++i) out[i] += p.acc[i] * f;
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int i = 0; i < d; ++i) out[i] *= inv;
}

}  // namespace

template <class S>
void decode_attention(const float* q, int q_heads, int kv_heads, int head_dim, const std::int64_t* offsets,
                      const S* k, const S* v, const float* log_bias, float* out) {
  const int d = head_dim, G = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> qs(static_cast<std::size_t>(q_heads) * d);
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  const std::vector<Chunk> chunks = make_chunks(kv_heads, offsets);
  // parts[c * G + h]: chunk c, h-th q head of its group; accumulators in one buffer.
  std::vector<Partial> parts(chunks.size() * static_cast<std::size_t>(G));
  std::vector<float> accs(parts.size() * static_cast<std::size_t>(d), 0.0f);
  for (std::size_t i = 0; i < parts.size(); ++i) parts[i].acc = accs.data() + i * static_cast<std::size_t>(d);
  const auto n_chunks = static_cast<std::int64_t>(chunks.size());
#pragma omp parallel
  {
    std::vector<float> kbuf(static_cast<std::size_t>(kBlock) * d), vbuf(kbuf.size()),
        x(static_cast<std::size_t>(G) * kBlock);
#pragma omp for schedule(dynamic)
    for (std::int64_t c = 0; c < n_chunks; ++c) {
      const Chunk& ch = chunks[static_cast<std::size_t>(c)];
      attend_chunk(ch, qs.data() + static_cast<std::ptrdiff_t>(ch.g) * G * d, G, d, k, v, log_bias,
                   parts.data() + c * G, kbuf, vbuf, x);
    }
#pragma omp for schedule(static)
    for (int h = 0; h < q_heads; ++h) {
      const int g = h / G;
      const auto first = static_cast<std::size_t>(
          std::find_if(chunks.begin(), chunks.end(), [g](const Chunk& ch) { return ch.g == g; }) - chunks.begin());
      std::size_t n = 0;
      while (first + n < chunks.size() && chunks[first + n].g == g) ++n;
      merge_partials(parts.data() + first * static_cast<std::size_t>(G) + static_cast<std::size_t>(h % G), n,
                     static_cast<std::size_t>(G), d, out + static_cast<std::ptrdiff_t>(h) * d);
    }
  }
}

#define KVSCOPE_RAGGED(S)                                                                                        \
  template void apply_ragged_plan<S>(const RaggedPlan&, const S*, const S*, std::int64_t, int, S*, S*);          \
  template void decode_attention<S>(const float*, int, int, int, const std::int64_t*, const S*, const S*,        \
                                    const float*, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_RAGGED)

}  // namespace kvscope::opt::cpu
