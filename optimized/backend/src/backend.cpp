#include "kvscope/opt/backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kvscope/core/error.hpp"
#include "kvscope/opt/cpu/select.hpp"

namespace kvscope::opt {

Backend parse_backend(const std::string& text) {
  if (text == "reference") return Backend::kReference;
  if (text == "cpu") return Backend::kCpu;
  if (text == "cuda") return Backend::kCuda;
  throw Error(ErrorKind::kUsage, "unknown backend '" + text + "' (known: reference, cpu, cuda)");
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kReference: return "reference";
    case Backend::kCpu: return "cpu";
    case Backend::kCuda: return "cuda";
  }
  return "?";
}

ref::LayerScores ScoreSet::to_reference() const {
  ref::LayerScores out;
  out.protected_tokens = protected_tokens;
  for (int h = 0; h < heads; ++h) {
    ref::VecX s(tokens);
    for (std::int64_t j = 0; j < tokens; ++j) s[j] = static_cast<double>(head(h)[j]);
    out.per_kv_head.push_back(std::move(s));
  }
  return out;
}

std::vector<Plan> select_per_head(const ScoreSet& scores, const std::vector<std::int64_t>& head_budgets,
                                  const std::string& method) {
  const std::int64_t T = scores.tokens;
  const auto& prot = scores.protected_tokens;
  const std::vector<std::int64_t> candidate_tokens = ref::complement(T, prot);
  const cpu::Candidates candidates(candidate_tokens);  // its layout checked once for every head
  const auto n_prot = static_cast<std::int64_t>(prot.size());
  // The heads' checks and top-k run in parallel, one head per thread; the
  // first bad head in head order names the error afterwards.
  const auto bad_budget = [&](int h) {
    const std::int64_t budget = head_budgets[static_cast<std::size_t>(h)];
    return budget < T && budget < n_prot;
  };
  // A head whose scores and budget equal the previous head's (TOVA scores the
  // layer once for every head) takes that head's plan instead of a top-k:
  // source[h] is the head whose plan it takes (itself, if none).
  std::vector<int> source(static_cast<std::size_t>(scores.heads));
  for (int h = 0; h < scores.heads; ++h)
    source[static_cast<std::size_t>(h)] =
        h > 0 && head_budgets[static_cast<std::size_t>(h)] == head_budgets[static_cast<std::size_t>(h - 1)] &&
                std::memcmp(scores.head(h), scores.head(h - 1), static_cast<std::size_t>(T) * sizeof(float)) == 0
            ? source[static_cast<std::size_t>(h - 1)]
            : h;
  const auto repeats = [&](int h) { return source[static_cast<std::size_t>(h)] != h; };
  std::vector<Plan> plans(static_cast<std::size_t>(scores.heads));
  std::vector<std::int64_t> nan_at(static_cast<std::size_t>(scores.heads), -1);  // first NaN candidate, per head
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int h = 0; h < scores.heads; ++h) {
      const std::int64_t budget = head_budgets[static_cast<std::size_t>(h)];
      if (repeats(h)) continue;
      if (budget >= T) {
        plans[static_cast<std::size_t>(h)] = Plan::identity(T);
        continue;
      }
      if (bad_budget(h)) continue;
      const float* s = scores.head(h);
      // NaN among the candidates is an error; a vectorised check of the
      // whole row first spares the indexed search when there is none.
      const auto nan = !cpu::any_nan(s, T) ? candidate_tokens.end()
                                 : std::find_if(candidate_tokens.begin(), candidate_tokens.end(), [s](std::int64_t j) { return std::isnan(s[j]); });
      if (nan != candidate_tokens.end()) {
        nan_at[static_cast<std::size_t>(h)] = *nan;
        continue;
      }
      // Room for the protected tokens too: those after every kept one (a
      // recent window, the usual case) are appended in place and the vector
      // becomes the plan's token array, with no merged copy.
      std::vector<std::int64_t> kept;
      kept.reserve(static_cast<std::size_t>(budget) + 16);
      cpu::top_k(s, candidates, budget - n_prot, kept);
      if (!kept.empty() && !prot.empty() && prot.front() <= kept.back()) {
        plans[static_cast<std::size_t>(h)] = Plan::keep(T, ref::merge_sorted(kept, prot));
        continue;
      }
      kept.insert(kept.end(), prot.begin(), prot.end());
      plans[static_cast<std::size_t>(h)] = Plan::keep(T, std::move(kept));
    }
    // Repeated heads copy their source's plan, on every thread (TOVA: seven
    // copies of a head's plan were a serial tail).
#pragma omp for schedule(static)
    for (int h = 0; h < scores.heads; ++h)
      if (repeats(h)) plans[static_cast<std::size_t>(h)] = plans[static_cast<std::size_t>(source[static_cast<std::size_t>(h)])];
  }
  for (int h = 0; h < scores.heads; ++h) {
    if (repeats(h)) continue;  // its errors are its source's
    if (bad_budget(h))
      throw Error(ErrorKind::kImpossibleBudget, method + ": budget " +
                                                    std::to_string(head_budgets[static_cast<std::size_t>(h)]) +
                                                    " of kv head " + std::to_string(h) + " cannot hold its " +
                                                    std::to_string(n_prot) + " protected tokens");
    if (nan_at[static_cast<std::size_t>(h)] >= 0)
      throw Error(ErrorKind::kBadNumber, method + ": score of token " +
                                            std::to_string(nan_at[static_cast<std::size_t>(h)]) + " of kv head " +
                                            std::to_string(h) + " is NaN");
  }
  return plans;
}

}  // namespace kvscope::opt
