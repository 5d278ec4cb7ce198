#include "kvscope/opt/ragged_cache.hpp"

#include <limits>

#include "kvscope/core/error.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt {

std::vector<float> RaggedCache::log_count_bias() const {
  std::vector<float> b(count.size());
  for (std::size_t i = 0; i < count.size(); ++i) b[i] = math::log_count_bias(count[i]);
  return b;
}

FlatPlans flatten(const std::vector<Plan>& plans) {
  FlatPlans f;
  for (const Plan& p : plans) {
    for (std::int64_t i = 0; i < p.slots(); ++i) {
      for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
        f.token.push_back(p.token[static_cast<std::size_t>(e)]);
        f.coef_k.push_back(static_cast<float>(p.coef_k[static_cast<std::size_t>(e)]));
        f.coef_v.push_back(static_cast<float>(p.coef_v[static_cast<std::size_t>(e)]));
      }
      f.row_ptr.push_back(static_cast<std::int64_t>(f.token.size()));
      // A re-rotated slot's key moves from its first token's position to the slot's.
      const std::int64_t from = p.token[static_cast<std::size_t>(p.row_begin(i))];
      f.rotate.push_back(p.positions == PositionMode::kRerotated ? p.position[static_cast<std::size_t>(i)] - from : 0);
      f.count.push_back(p.count[static_cast<std::size_t>(i)]);
    }
    f.offsets.push_back(static_cast<std::int64_t>(f.count.size()));
  }
  return f;
}

RaggedCache compact(const LayerStorage& layer, const std::vector<Plan>& plans, double rope_theta, bool poison) {
  const int H = layer.shape.kv_heads, d = layer.shape.head_dim;
  const std::int64_t T = layer.shape.tokens;
  if (static_cast<int>(plans.size()) != H)
    throw Error(ErrorKind::kInternal, "compact: " + std::to_string(plans.size()) + " plans for " + std::to_string(H) +
                                          " kv heads");
  for (const Plan& p : plans)
    if (p.n != T) throw Error(ErrorKind::kInternal, "compact: a plan over " + std::to_string(p.n) + " tokens for a " +
                                                        std::to_string(T) + "-token prefill");
  FlatPlans flat = flatten(plans);
  RaggedCache c;
  c.heads = H;
  c.head_dim = d;
  c.offsets = flat.offsets;
  c.count = std::move(flat.count);
  c.k = StorageBuffer(layer.k.dtype(), c.rows() * d);
  c.v = StorageBuffer(layer.v.dtype(), c.rows() * d);
  if (poison) {
    c.k.poison();
    c.v.poison();
  }
  const cpu::RaggedPlan rp = flat.view(rope_theta);
  cpu::dispatch_storage(layer.k.dtype(), [&](auto tag) {
    using S = decltype(tag);
    cpu::apply_ragged_plan<S>(rp, layer.k.data<S>(), layer.v.data<S>(), T, d, c.k.data<S>(), c.v.data<S>());
  });
  return c;
}

std::vector<float> decode_attention(const RaggedCache& cache, const std::vector<float>& q, int q_heads,
                                    bool log_count_bias) {
  std::vector<float> out(static_cast<std::size_t>(q_heads) * static_cast<std::size_t>(cache.head_dim),
                         std::numeric_limits<float>::quiet_NaN());
  const std::vector<float> bias = log_count_bias ? cache.log_count_bias() : std::vector<float>{};
  cpu::dispatch_storage(cache.k.dtype(), [&](auto tag) {
    using S = decltype(tag);
    cpu::decode_attention<S>(q.data(), q_heads, cache.heads, cache.head_dim, cache.offsets.data(), cache.k.data<S>(),
                             cache.v.data<S>(), log_count_bias ? bias.data() : nullptr, out.data());
  });
  return out;
}

}  // namespace kvscope::opt
