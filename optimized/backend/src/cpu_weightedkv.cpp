// WeightedKV prefill on the CPU. Streaming (the default): the hot part, each
// prompt query's attention over the current slots (every q head of the group,
// softmax, group reduction), is group_block_logits (one GEMM per 32 prompt
// queries against the keys they may see) then group_prefix_softmax; the
// drop-and-merge loop (victim, neighbour, lambda) is the reference's one
// implementation, ref::weightedkv_stream / weightedkv_compress. One kv head
// per thread: each head's loop is sequential and independent. One-shot: the
// accumulated-attention kernel, then the same shared loop. The neighbour value
// merges are plan rows, built into the cache by apply_ragged_plan.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "cpu_families.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/opt/cpu/merging.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/reference/methods/weightedkv.hpp"

namespace kvscope::opt {
namespace {

/// Prompt queries whose logits one GEMM computes (streaming prefill). 32: a
/// block's logits are 2 MB at G = 4 and 4096 slots, read back soon enough
/// (3.5% faster than 64 at T = 8192; 16 re-reads the keys too often).
constexpr std::int64_t kQueryBlock = 32;

class WeightedKVCpu final : public BackendMethod {
 public:
  explicit WeightedKVCpu(const ref::Params& p) : c_(ref::weightedkv_config(p)) {}

  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    c_.check_budget(budget);
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads, G = in.shape.group();
    std::vector<Plan> plans(static_cast<std::size_t>(hkv));
    if (!c_.streaming_prefill) {
      std::vector<float> computed, sums(static_cast<std::size_t>(hkv * T));
      const float* acc = accumulated_attention(in, computed);
      cpu::group_reduce(acc, hq, hkv, T, to_cpu(c_.gqa), sums.data());
      for (int g = 0; g < hkv; ++g) {
        const ref::VecX s = Eigen::Map<const Eigen::VectorXf>(sums.data() + static_cast<std::int64_t>(g) * T, T).cast<double>();
        plans[static_cast<std::size_t>(g)] = ref::weightedkv_plan(ref::weightedkv_oneshot(s, budget, c_), T);
      }
      return ref::LayerPlans::uniform(std::move(plans), budget);
    }
    cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
      using S = decltype(tag);
      const S* q = in.q.data<S>();
      const S* k = in.k.data<S>();
      parallel_heads(hkv, [&](int g) {
        // When the loop reaches a block of prompt queries, one GEMM gives
        // their logits against every key they may see, read where they lie:
        // the keys alive now plus the block's own tokens (keys are never
        // modified, only dropped). A key dropped inside the block is
        // set to -inf in the logit rows of the block's later queries, so each
        // query's softmax runs over a prefix of its rows, with no gather.
        std::vector<float> logits, acc;
        std::vector<std::int64_t> keys, cols;  // the block's column keys; the slots' columns, in slot order
        std::int64_t t0 = 0, n = 0, nk = 0, base = 0;  // base: slots at the block's start (token t0 the last)
        const auto internal = [&](std::int64_t i, const std::string& what) {
          return Error(ErrorKind::kInternal, "weightedkv (cpu): prompt token " + std::to_string(i) + ": " + what);
        };
        const auto key_of = [&](std::int64_t col) { return keys[static_cast<std::size_t>(col)]; };
        const auto attend = [&](std::int64_t i, const std::vector<ref::WeightedSlot>& slots, std::vector<double>& out) {
          const auto m = static_cast<std::int64_t>(slots.size());
          if (i < t0 || i >= t0 + n) {
            t0 = i;
            n = std::min(kQueryBlock, T - i);
            keys.clear();
            for (const ref::WeightedSlot& s : slots) keys.push_back(s.key);
            base = m;
            for (std::int64_t j = i + 1; j < t0 + n; ++j) keys.push_back(j);
            nk = static_cast<std::int64_t>(keys.size());
            logits.resize(static_cast<std::size_t>(G * n * nk));
            acc.resize(static_cast<std::size_t>(nk));
            cpu::group_block_logits(in.shape, q, k, keys.data(), nk, g, t0, n, logits.data());
            cols.resize(static_cast<std::size_t>(m));
            std::iota(cols.begin(), cols.end(), std::int64_t{0});
          } else {
            // Since the last call the stream dropped slots and appended token
            // i, keeping the order (keys increasing): the first slot whose key
            // differs from its old column's is where one was dropped.
            const std::int64_t dropped = static_cast<std::int64_t>(cols.size()) + 1 - m;
            if (dropped < 0) throw internal(i, "the cache grew by more than one slot");
            std::int64_t from = 0;
            for (std::int64_t e = 0; e < dropped; ++e) {
              std::int64_t lo = from, hi = m - 1;  // the first mismatch lies in [lo, hi]
              while (lo < hi) {
                const std::int64_t mid = lo + (hi - lo) / 2;
                if (key_of(cols[static_cast<std::size_t>(mid)]) == slots[static_cast<std::size_t>(mid)].key)
                  lo = mid + 1;
                else
                  hi = mid;
              }
              const std::int64_t c = cols[static_cast<std::size_t>(lo)];
              for (int h = 0; h < G; ++h)  // no later query of the block sees key c
                for (std::int64_t r = i - t0; r < n; ++r)
                  logits[static_cast<std::size_t>((h * n + r) * nk + c)] = -INFINITY;
              cols.erase(cols.begin() + lo);
              from = lo;
            }
            cols.push_back(base - 1 + (i - t0));
          }
          // The mapping is checked in full once per block (at its last query)
          // and its ends at every query: a slot list out of order fails here.
          const bool full_check = i == t0 + n - 1;
          for (std::int64_t s = 0; s < m; ++s) {
            if (!full_check && s == 1) s = m - 1;
            const std::int64_t key = slots[static_cast<std::size_t>(s)].key;
            if (key_of(cols[static_cast<std::size_t>(s)]) != key)
              throw internal(i, "slot " + std::to_string(s) + " (key " + std::to_string(key) + ") is not at its logit column");
          }
          const std::int64_t len = base + (i - t0);  // columns of the keys up to token i
          cpu::group_prefix_softmax(&logits[static_cast<std::size_t>((i - t0) * nk)], n * nk, G, len, to_cpu(c_.gqa),
                                    acc.data());
          out.resize(static_cast<std::size_t>(m));
          for (std::size_t s = 0; s < out.size(); ++s) out[s] = acc[static_cast<std::size_t>(cols[s])];
        };
        plans[static_cast<std::size_t>(g)] = ref::weightedkv_plan(ref::weightedkv_stream(T, budget, c_, attend), T);
      });
    });
    return ref::LayerPlans::uniform(std::move(plans), budget);
  }

 private:
  ref::WeightedKVConfig c_;
};

}  // namespace

std::unique_ptr<BackendMethod> make_cpu_weightedkv(const ref::Params& p) { return std::make_unique<WeightedKVCpu>(p); }

}  // namespace kvscope::opt
