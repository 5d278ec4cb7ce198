// WeightedKV prefill on the CPU. Streaming (the default): the hot part, each
// prompt query's attention over the current slots (every q head of the group,
// softmax, group reduction), is group_block_logits (one GEMM per 64 prompt
// queries against the keys they may see) then group_slot_softmax; the
// drop-and-merge loop (victim, neighbour, lambda) is the reference's one
// implementation, ref::weightedkv_stream / weightedkv_compress. One kv head
// per thread: each head's loop is sequential and independent. One-shot: the
// accumulated-attention kernel, then the same shared loop. The neighbour value
// merges are plan rows, built into the cache by apply_ragged_plan.
#include <algorithm>
#include <string>

#include "cpu_families.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/opt/cpu/merging.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/reference/methods/weightedkv.hpp"

namespace kvscope::opt {
namespace {

/// Prompt queries whose logits one GEMM computes (streaming prefill).
constexpr std::int64_t kQueryBlock = 64;

class WeightedKVCpu final : public BackendMethod {
 public:
  explicit WeightedKVCpu(const ref::Params& p) : c_(ref::weightedkv_config(p)) {}

  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    c_.check_budget(budget);
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads, d = in.shape.head_dim, G = in.shape.group();
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
        // The head's keys in fp32 once. When the loop reaches a block of
        // prompt queries, one GEMM gives their logits against every key they
        // may see: the keys alive now plus the block's own tokens (keys are
        // never modified, only dropped).
        std::vector<float> K(static_cast<std::size_t>(T * d)), rows, logits;
        cpu::load_row(k + static_cast<std::int64_t>(g) * T * d, T * d, K.data());
        std::vector<std::int64_t> keys, col_of(static_cast<std::size_t>(T), -1), cols;
        std::int64_t t0 = 0, n = 0;
        std::vector<float> scratch, probs;
        const auto attend = [&](std::int64_t i, const std::vector<ref::WeightedSlot>& slots, std::vector<double>& out) {
          if (i < t0 || i >= t0 + n) {
            t0 = i;
            n = std::min(kQueryBlock, T - i);
            keys.clear();
            for (const ref::WeightedSlot& s : slots) keys.push_back(s.key);
            for (std::int64_t j = i + 1; j < t0 + n; ++j) keys.push_back(j);
            const auto nk = static_cast<std::int64_t>(keys.size());
            rows.resize(static_cast<std::size_t>(nk * d));
            for (std::int64_t c = 0; c < nk; ++c) {
              const auto key = static_cast<std::size_t>(keys[static_cast<std::size_t>(c)]);
              col_of[key] = c;
              std::copy_n(&K[key * static_cast<std::size_t>(d)], d, &rows[static_cast<std::size_t>(c * d)]);
            }
            logits.resize(static_cast<std::size_t>(G * n * nk));
            cpu::group_block_logits(in.shape, q, rows.data(), nk, g, t0, n, logits.data());
          }
          const auto m = static_cast<std::int64_t>(slots.size()), nk = static_cast<std::int64_t>(keys.size());
          cols.resize(static_cast<std::size_t>(m));
          for (std::int64_t s = 0; s < m; ++s) {
            const std::int64_t key = slots[static_cast<std::size_t>(s)].key;
            const std::int64_t c = col_of[static_cast<std::size_t>(key)];
            if (c < 0 || c >= nk || keys[static_cast<std::size_t>(c)] != key)
              throw Error(ErrorKind::kInternal, "weightedkv (cpu): slot key " + std::to_string(key) +
                                                    " is not among the block's logit columns");
            cols[static_cast<std::size_t>(s)] = c;
          }
          scratch.resize(static_cast<std::size_t>(m));
          probs.resize(static_cast<std::size_t>(m));
          cpu::group_slot_softmax(&logits[static_cast<std::size_t>((i - t0) * nk)], n * nk, G, cols.data(), m,
                                  to_cpu(c_.gqa), scratch.data(), probs.data());
          out.assign(probs.begin(), probs.end());
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
