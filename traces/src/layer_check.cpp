// One layer in memory against its metadata: the shape and value rules the
// writer applies before writing and replay applies to layers that did not come
// through the reader (tests, fuzzers, recorders). Same messages as the reader.
#include <string>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "schema.hpp"

namespace kvscope::traces {
namespace {

std::string shape_string(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

void check_layer(const TraceMeta& meta, const LayerData& data, const std::string& label) {
  for (const schema::DatasetSpec& spec : schema::datasets()) {
    const Tensor* t = schema::find(data, spec);
    const std::string what = label + ": " + schema::dataset_name(spec);
    const char* flag = schema::presence_flag(spec);  // never null for an optional dataset
    const bool want = schema::is_present(spec, meta);
    if (want && t == nullptr) throw Error(ErrorKind::kTraceInvalid, what + " is missing but " + flag + " = 1");
    if (!want && t != nullptr) throw Error(ErrorKind::kTraceInvalid, what + " is given but " + flag + " = 0");
    if (t == nullptr) continue;
    const std::vector<std::int64_t> expected = schema::shape(spec, meta);
    if (t->shape != expected)
      throw Error(ErrorKind::kTraceInvalid,
                  what + " has shape " + shape_string(t->shape) + ", expected " + shape_string(expected));
    if (t->size() != Tensor::count(t->shape))
      throw Error(ErrorKind::kTraceInvalid, what + " holds " + std::to_string(t->size()) +
                                                " values, its shape says " + std::to_string(Tensor::count(t->shape)));
    schema::check_values(*t, spec, what);
  }
}

}  // namespace kvscope::traces
