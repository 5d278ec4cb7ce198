// opt::select_per_head: the heads' checks run in parallel with their top-k,
// yet the error names the first bad head in head order, as the reference's does.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "kvscope/core/error.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/scores.hpp"

using namespace kvscope;

namespace {

/// Four heads of eight tokens, scores j + h, tokens 6 and 7 protected.
opt::ScoreSet four_heads() {
  opt::ScoreSet s{4, 8, {}, {6, 7}};
  for (int h = 0; h < 4; ++h)
    for (int j = 0; j < 8; ++j) s.scores.push_back(static_cast<float>(j + h));
  return s;
}

/// The error select_per_head raises, or "" when it returns.
std::string error_of(const opt::ScoreSet& s, const std::vector<std::int64_t>& budgets, ErrorKind* kind = nullptr) {
  try {
    opt::select_per_head(s, budgets, "m");
  } catch (const Error& e) {
    if (kind) *kind = e.kind();
    return e.what();
  }
  return "";
}

}  // namespace

TEST(BackendSelect, KeepsProtectedTokensAndTheBestOthersPerHead) {
  const std::vector<Plan> plans = opt::select_per_head(four_heads(), {4, 8, 2, 3}, "m");
  ASSERT_EQ(plans.size(), 4u);
  EXPECT_EQ(plans[0].token, (std::vector<std::int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(plans[1].token, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));  // budget covers the cache
  EXPECT_EQ(plans[2].token, (std::vector<std::int64_t>{6, 7}));
  EXPECT_EQ(plans[3].token, (std::vector<std::int64_t>{5, 6, 7}));
}

TEST(BackendSelect, TheFirstBadHeadInOrderNamesTheError) {
  opt::ScoreSet s = four_heads();
  s.scores[3 * 8 + 2] = NAN;  // head 3, token 2
  ErrorKind kind{};
  // Head 1 cannot hold its two protected tokens; head 3's NaN comes later.
  EXPECT_EQ(error_of(s, {4, 1, 4, 4}, &kind), "m: budget 1 of kv head 1 cannot hold its 2 protected tokens");
  EXPECT_EQ(kind, ErrorKind::kImpossibleBudget);
  // Only the NaN: it is named with its head and token.
  EXPECT_EQ(error_of(s, {4, 4, 4, 4}, &kind), "m: score of token 2 of kv head 3 is NaN");
  EXPECT_EQ(kind, ErrorKind::kBadNumber);
  // A NaN in head 0 comes before head 1's budget.
  s.scores[0 * 8 + 5] = NAN;
  EXPECT_EQ(error_of(s, {4, 1, 4, 4}, &kind), "m: score of token 5 of kv head 0 is NaN");
  EXPECT_EQ(kind, ErrorKind::kBadNumber);
  // A NaN on a protected token is never compared, so it is no error.
  opt::ScoreSet p = four_heads();
  p.scores[6] = NAN;
  EXPECT_EQ(error_of(p, {4, 4, 4, 4}), "");
}

// Heads whose scores and budget equal the previous head's (TOVA's one score
// row for every head) take its plan without a top-k of their own; the copies
// must be the plans those heads would get, and errors stay the source's.
TEST(BackendSelect, RepeatedHeadsTakeTheirSourcesPlan) {
  opt::ScoreSet s{4, 8, {}, {6, 7}};
  for (int h = 0; h < 4; ++h)
    for (int j = 0; j < 8; ++j) s.scores.push_back(static_cast<float>(h < 3 ? j : 7 - j));
  std::vector<Plan> plans = opt::select_per_head(s, {4, 4, 4, 4}, "m");
  for (int h = 0; h < 3; ++h) EXPECT_EQ(plans[h].token, (std::vector<std::int64_t>{4, 5, 6, 7})) << "head " << h;
  EXPECT_EQ(plans[3].token, (std::vector<std::int64_t>{0, 1, 6, 7}));
  EXPECT_EQ(plans[1], plans[0]);
  // A different budget breaks the chain: head 2 selects on its own.
  plans = opt::select_per_head(s, {4, 4, 3, 4}, "m");
  EXPECT_EQ(plans[1].token, (std::vector<std::int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(plans[2].token, (std::vector<std::int64_t>{5, 6, 7}));
  // A NaN in the chain's first head is named there, once.
  s.scores[3] = NAN;
  for (int h = 1; h < 3; ++h) s.scores[h * 8 + 3] = NAN;
  EXPECT_EQ(error_of(s, {4, 4, 4, 4}), "m: score of token 3 of kv head 0 is NaN");
}
