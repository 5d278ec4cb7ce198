#include <gtest/gtest.h>

#include "kvscope/core/budget.hpp"
#include "kvscope/core/error.hpp"

using kvscope::Budget;
using kvscope::Error;
using kvscope::ErrorKind;

TEST(Budget, IntegerIsTokensDecimalAndPercentAreRatios) {
  EXPECT_EQ(Budget::parse("128").kind, Budget::Kind::kTokens);
  EXPECT_EQ(Budget::parse("128").resolve(1000), 128);
  EXPECT_EQ(Budget::parse("0.5").kind, Budget::Kind::kRatio);
  EXPECT_EQ(Budget::parse("0.5").resolve(1001), 500);  // floor, as kvpress
  EXPECT_EQ(Budget::parse("35%").resolve(100), 35);    // no 34 from 0.35 * 100 rounding
  EXPECT_EQ(Budget::parse("1.0").resolve(77), 77);
  EXPECT_EQ(Budget::parse("0").resolve(10), 0);
}

TEST(Budget, TokenBudgetsAreCacheSizesNotCappedAtThePrompt) {
  EXPECT_EQ(Budget::parse("4096").resolve(512), 4096);
  EXPECT_EQ(Budget::parse("100%").resolve(512), 512);
}

TEST(Budget, LabelsRoundTrip) {
  EXPECT_EQ(Budget::parse("50%").label(), "50%");
  EXPECT_EQ(Budget::parse("0.35").label(), "35%");
  EXPECT_EQ(Budget::parse("64").label(), "64");
}

TEST(Budget, RejectsBadTextByName) {
  for (const char* bad : {"", "-3", "abc", "1.5", "0.0", "120%", "nan", "12x", "0.5.5"}) {
    try {
      Budget::parse(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUsage);
      EXPECT_NE(std::string(e.what()).find("budget '" + std::string(bad) + "'"), std::string::npos) << e.what();
    }
  }
}
