#include "kvscope/traces/repro.hpp"

#include "h5_util.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::traces {

using namespace detail;

void write_repro(const std::string& path, const TraceMeta& meta, const LayerData& layer, const ReproInfo& info,
                 const ReproArrays& arrays) {
  TraceMeta one = meta;
  one.layers = 1;
  {
    TraceWriter w(path, one);
    w.write_layer(0, layer);
    w.close();
  }
  h5_quiet();
  const std::string what = "cannot add the repro group to " + path;
  H5Id file = h5_own(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, ErrorKind::kIo, what);
  H5Id g = create_group(file.get(), "repro", "/repro");
  write_string_attr(g.get(), "method", info.method);
  write_string_attr(g.get(), "budget", info.budget);
  write_string_attr(g.get(), "backend", info.backend);
  write_string_attr(g.get(), "failure", info.failure);
  write_int_attr(g.get(), "layer", info.layer);
  write_int_attr(g.get(), "layers", info.layers);
  write_int_attr(g.get(), "seed", info.seed);
  for (const auto& [name, values] : arrays) {
    const hsize_t n = values.size();
    H5Id space = h5_own(H5Screate_simple(1, &n, nullptr), H5Sclose, ErrorKind::kIo, what);
    H5Id d = h5_own(H5Dcreate2(g.get(), name.c_str(), H5T_IEEE_F64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                    H5Dclose, ErrorKind::kIo, what + " (dataset " + name + ")");
    if (n > 0) h5_check(H5Dwrite(d.get(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), ErrorKind::kIo, what);
  }
}

std::optional<ReproInfo> read_repro_info(const std::string& path) {
  h5_quiet();
  H5Id file = open_file_readonly(path);
  std::optional<H5Id> g = open_child(file.get(), "repro", ObjectKind::kGroup, "/repro");
  if (!g) return std::nullopt;
  ReproInfo info;
  const std::string owner = "/repro";
  info.method = require_string_attr(g->get(), "method", owner);
  info.budget = require_string_attr(g->get(), "budget", owner);
  info.backend = require_string_attr(g->get(), "backend", owner);
  info.failure = read_string_attr(g->get(), "failure", owner).value_or("");
  const std::int64_t layer = require_int_attr(g->get(), "layer", owner), layers = require_int_attr(g->get(), "layers", owner);
  if (layers < 1 || layers > 4096 || layer < 0 || layer >= layers)
    throw_invalid("/repro: layer " + std::to_string(layer) + " of " + std::to_string(layers) + " is out of range");
  info.layer = static_cast<int>(layer);
  info.layers = static_cast<int>(layers);
  info.seed = read_int_attr(g->get(), "seed", owner).value_or(0);
  return info;
}

}  // namespace kvscope::traces
