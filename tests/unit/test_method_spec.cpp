#include <gtest/gtest.h>

#include "kvscope/core/error.hpp"
#include "kvscope/core/method_spec.hpp"

using kvscope::Error;
using kvscope::ErrorKind;
using kvscope::MethodSpec;

TEST(MethodSpec, ParsesFamilyPresetAndParameters) {
  const MethodSpec s = MethodSpec::parse("streaming_llm@kvpress:sinks=8:recent=auto");
  EXPECT_EQ(s.family, "streaming_llm");
  EXPECT_EQ(s.preset, "kvpress");
  EXPECT_EQ(s.params.at("sinks"), "8");
  EXPECT_EQ(s.params.at("recent"), "auto");
  EXPECT_EQ(MethodSpec::parse(s.to_string()).to_string(), s.to_string());
}

TEST(MethodSpec, ParsesLists) {
  const auto list = MethodSpec::parse_list("full,streaming_llm@paper,streaming_llm:sinks=2");
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[1].preset, "paper");
  EXPECT_EQ(list[2].params.at("sinks"), "2");
}

TEST(MethodSpec, RejectsMalformedText) {
  for (const char* bad : {"", "@paper", "full@", "x:sinks", "x:=3", "x:a=", "x:a=1:a=2", "bad name", "x,,y"}) {
    EXPECT_THROW(
        {
          try {
            MethodSpec::parse_list(bad);
          } catch (const Error& e) {
            EXPECT_EQ(e.kind(), ErrorKind::kUsage);
            throw;
          }
        },
        Error)
        << bad;
  }
}
