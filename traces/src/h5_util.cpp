#include "h5_util.hpp"

#include <H5LTpublic.h>
#include <H5PLpublic.h>

#include <array>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <system_error>

namespace kvscope::traces::detail {
namespace {

std::string type_class_name(H5T_class_t cls) {
  switch (cls) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "float";
    case H5T_STRING: return "string";
    case H5T_BITFIELD: return "bitfield";
    case H5T_OPAQUE: return "opaque";
    case H5T_COMPOUND: return "compound";
    case H5T_REFERENCE: return "reference";
    case H5T_ENUM: return "enum";
    case H5T_VLEN: return "variable-length";
    case H5T_ARRAY: return "array";
    default: return "unknown";
  }
}

// Printable form of a name taken from a file (it may hold any bytes).
std::string printable(const std::string& s) {
  std::string out;
  for (char c : s) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}

bool equal_to_any(hid_t type, std::initializer_list<hid_t> candidates) {
  for (hid_t c : candidates)
    if (H5Tequal(type, c) > 0) return true;
  return false;
}

// Opens attribute `name` of `obj` when present and checks it holds one value.
std::optional<H5Id> open_scalar_attr(hid_t obj, const char* name, const std::string& what) {
  const htri_t exists = H5Aexists(obj, name);
  if (exists < 0) h5_check(-1, ErrorKind::kIo, what + ": cannot look it up");
  if (exists == 0) return std::nullopt;
  H5Id attr = h5_own(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose, ErrorKind::kIo, what + ": cannot open it");
  H5Id space = h5_own(H5Aget_space(attr.get()), H5Sclose, ErrorKind::kTraceInvalid,
                      what + ": cannot read its dataspace");
  const H5S_class_t cls = H5Sget_simple_extent_type(space.get());
  const bool one_value = cls == H5S_SCALAR || (cls == H5S_SIMPLE && H5Sget_simple_extent_npoints(space.get()) == 1);
  if (!one_value) throw_invalid(what + " must hold a single value");
  return attr;
}

H5Id attr_type(hid_t attr, const std::string& what) {
  return h5_own(H5Aget_type(attr), H5Tclose, ErrorKind::kTraceInvalid, what + ": cannot read its type");
}

void write_attr(hid_t obj, const char* name, hid_t type, const void* value) {
  const std::string what = std::string("cannot write attribute '") + name + "'";
  if (H5Aexists(obj, name) > 0) h5_check(H5Adelete(obj, name), ErrorKind::kIo, what);
  H5Id space = h5_own(H5Screate(H5S_SCALAR), H5Sclose, ErrorKind::kIo, what);
  H5Id attr = h5_own(H5Acreate2(obj, name, type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                     ErrorKind::kIo, what);
  h5_check(H5Awrite(attr.get(), type, value), ErrorKind::kIo, what);
}

std::string bits(std::size_t bytes) { return std::to_string(bytes * 8) + "-bit"; }

std::string float_fields(hid_t type) {
  std::size_t spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0;
  H5Tget_fields(type, &spos, &epos, &esize, &mpos, &msize);
  return "(sign bit " + std::to_string(spos) + ", exponent " + std::to_string(esize) + " bits at " +
         std::to_string(epos) + ", mantissa " + std::to_string(msize) + " bits at " + std::to_string(mpos) +
         ", bias " + std::to_string(H5Tget_ebias(type)) + ")";
}

// The file type must be exactly the canonical one: same class, size, byte
// order, sign or float fields, and finally H5Tequal for everything else.
void check_type(hid_t dset, const DatasetExpect& e) {
  H5Id type = h5_own(H5Dget_type(dset), H5Tclose, ErrorKind::kTraceInvalid, e.label + ": cannot read its datatype");
  const H5T_class_t cls = H5Tget_class(type.get());
  const H5T_class_t want_cls = H5Tget_class(e.type);
  if (cls != want_cls)
    throw_invalid(e.label + " has " + type_class_name(cls) + " data, expected " + e.type_name);
  const std::size_t size = H5Tget_size(type.get());
  const std::size_t want_size = H5Tget_size(e.type);
  const std::string noun = cls == H5T_FLOAT ? " floats" : " integers";
  if (size != want_size)
    throw_invalid(e.label + " has " + bits(size) + noun + ", expected " + e.type_name + " (" + bits(want_size) + ")");
  if (H5Tget_order(type.get()) != H5Tget_order(e.type))
    throw_invalid(e.label + " has big-endian" + noun + ", expected little-endian " + e.type_name);
  if (cls == H5T_INTEGER && H5Tget_sign(type.get()) != H5Tget_sign(e.type))
    throw_invalid(e.label + " has unsigned integers, expected " + e.type_name);
  if (cls == H5T_FLOAT && float_fields(type.get()) != float_fields(e.type))
    throw_invalid(e.label + " has a " + bits(size) + " float with fields " + float_fields(type.get()) +
                  ", expected " + e.type_name + " " + float_fields(e.type));
  if (H5Tequal(type.get(), e.type) <= 0)
    throw_invalid(e.label + " has a datatype that differs from canonical " + e.type_name +
                  " (precision, offset, padding or normalization)");
}

std::string shape_nouns(const std::vector<Axis>& axes) {
  std::string s;
  for (const Axis& a : axes) s += (s.empty() ? "" : ", ") + std::string(a.noun);
  return s;
}

std::vector<std::int64_t> check_space(hid_t dset, const DatasetExpect& e) {
  H5Id space = h5_own(H5Dget_space(dset), H5Sclose, ErrorKind::kTraceInvalid, e.label + ": cannot read its dataspace");
  const H5S_class_t cls = H5Sget_simple_extent_type(space.get());
  if (cls != H5S_SIMPLE)
    throw_invalid(e.label + " has a " + (cls == H5S_SCALAR ? "scalar" : cls == H5S_NULL ? "null" : "non-simple") +
                  " dataspace, expected an array of " + shape_nouns(e.axes));
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank != static_cast<int>(e.axes.size()))
    throw_invalid(e.label + " has rank " + std::to_string(rank) + ", expected rank " + std::to_string(e.axes.size()) +
                  " [" + shape_nouns(e.axes) + "]");
  std::array<hsize_t, H5S_MAX_RANK> dims{};
  h5_check(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr), ErrorKind::kTraceInvalid,
           e.label + ": cannot read its dimensions");
  std::vector<std::int64_t> out;
  for (std::size_t i = 0; i < e.axes.size(); ++i) {
    const Axis& a = e.axes[i];
    const std::string have = e.label + " has " + std::to_string(dims[i]) + " " + a.noun;
    if (a.size >= 0 && dims[i] != static_cast<hsize_t>(a.size)) throw_invalid(have + ", expected " + a.expected);
    if (a.size < 0 && dims[i] > static_cast<hsize_t>(a.max))
      throw_invalid(have + ", more than the limit " + std::to_string(a.max));
    out.push_back(static_cast<std::int64_t>(dims[i]));
  }
  return out;
}

struct Pipeline {
  bool deflate = false;
  bool fletcher32 = false;
  unsigned deflate_index = 0;  // its bit in a chunk's filter mask
};

Pipeline check_filters(hid_t dcpl, const std::string& label) {
  const int n = H5Pget_nfilters(dcpl);
  if (n < 0) h5_check(-1, ErrorKind::kTraceInvalid, label + ": cannot read its filter pipeline");
  if (n > 8) throw_invalid(label + " has " + std::to_string(n) + " filters, more than any valid trace uses");
  Pipeline p;
  for (int i = 0; i < n; ++i) {
    unsigned flags = 0, config = 0;
    std::array<unsigned, 16> cd{};
    std::size_t cd_count = cd.size();
    std::array<char, 64> name{};
    const H5Z_filter_t id = H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &cd_count, cd.data(), name.size(),
                                           name.data(), &config);
    name.back() = '\0';
    if (id == H5Z_FILTER_DEFLATE) {
      p.deflate = true;
      p.deflate_index = static_cast<unsigned>(i);
    }
    else if (id == H5Z_FILTER_FLETCHER32) p.fletcher32 = true;
    else if (id != H5Z_FILTER_SHUFFLE)
      throw_invalid(label + " uses unsupported filter " + std::to_string(id) + " ('" + printable(name.data()) +
                    "'); only deflate, shuffle and fletcher32 are allowed");
  }
  return p;
}

std::string coords(const std::vector<hsize_t>& offset) {
  std::string s = "(";
  for (std::size_t i = 0; i < offset.size(); ++i) s += (i ? ", " : "") + std::to_string(offset[i]);
  return s + ")";
}

// Every chunk must be stored (a missing one reads back as fill values), with
// its whole filter pipeline applied and a plausible stored size. HDF5 1.10
// trusts each chunk's filter mask and size: a chunk claiming to skip deflate
// while holding fewer bytes than a chunk overruns HDF5's buffer on read.
void check_chunks(hid_t dset, const DatasetExpect& e, const std::vector<std::int64_t>& dims,
                  const std::array<hsize_t, H5S_MAX_RANK>& chunk, std::int64_t chunk_bytes, std::int64_t chunks,
                  const Pipeline& pipe) {
  hsize_t stored_chunks = 0;
  H5Id space = h5_own(H5Dget_space(dset), H5Sclose, ErrorKind::kTraceInvalid, e.label + ": cannot read its dataspace");
  h5_check(H5Dget_num_chunks(dset, space.get(), &stored_chunks), ErrorKind::kTraceInvalid,
           e.label + ": cannot read its chunk index");
  if (stored_chunks == 0) throw_invalid(e.label + " has no stored data (never written)");
  if (stored_chunks != static_cast<hsize_t>(chunks))
    throw_invalid(e.label + " is only partly written (" + std::to_string(stored_chunks) + " of " +
                  std::to_string(chunks) + " chunks stored)");
  // Deflate grows a chunk by at most zlib's compressBound (< 0.1% + 13 bytes)
  // and shrinks it at most ~1032:1: a higher ratio means a corrupt chunk or a
  // decompression bomb. Unfiltered chunks are stored whole, +4 bytes of checksum.
  const std::int64_t checksum = pipe.fletcher32 ? 4 : 0;
  const std::int64_t raw_size = chunk_bytes + checksum;
  const std::int64_t max_deflated = chunk_bytes + chunk_bytes / 1024 + 64 + checksum;
  const std::int64_t min_deflated = chunk_bytes / 1100 + 1 + checksum;
  const unsigned optional_mask = pipe.deflate ? 1u << pipe.deflate_index : 0u;

  std::vector<hsize_t> offset(dims.size(), 0);
  for (std::int64_t n = 0; n < chunks; ++n) {
    unsigned mask = 0;
    haddr_t addr = HADDR_UNDEF;
    hsize_t size = 0;
    h5_check(H5Dget_chunk_info_by_coord(dset, offset.data(), &mask, &addr, &size), ErrorKind::kTraceInvalid,
             e.label + ": cannot read chunk " + coords(offset));
    const std::string at = e.label + " chunk " + coords(offset);
    if (addr == HADDR_UNDEF) throw_invalid(at + " is not stored (partly written dataset)");
    if ((mask & ~optional_mask) != 0)
      throw_invalid(at + " skips required filters (filter mask " + std::to_string(mask) + ")");
    const bool deflated = pipe.deflate && (mask & optional_mask) == 0;
    const auto stored = static_cast<std::int64_t>(size);
    if (deflated ? (stored < min_deflated || stored > max_deflated) : stored != raw_size)
      throw_invalid(at + " stores " + std::to_string(stored) + " bytes for a " + std::to_string(chunk_bytes) +
                    "-byte chunk" + (deflated ? " (implausible compression ratio)" : ""));
    // Next chunk coordinate, last axis fastest.
    for (std::size_t i = offset.size(); i-- > 0;) {
      offset[i] += chunk[i];
      if (offset[i] < static_cast<hsize_t>(dims[i])) break;
      offset[i] = 0;
    }
  }
}

// Layout, chunking and stored size. `elem` is the element size in bytes.
void check_storage(hid_t dset, const DatasetExpect& e, const std::vector<std::int64_t>& dims, std::int64_t elem) {
  H5Id dcpl = h5_own(H5Dget_create_plist(dset), H5Pclose, ErrorKind::kTraceInvalid,
                     e.label + ": cannot read its creation properties");
  const H5D_layout_t layout = H5Pget_layout(dcpl.get());
  if (layout == H5D_COMPACT) throw_invalid(e.label + " has compact layout; only contiguous or chunked is allowed");
  if (layout == H5D_VIRTUAL)
    throw_invalid(e.label + " has virtual layout (data mapped from other datasets); only contiguous or chunked is allowed");
  if (layout != H5D_CONTIGUOUS && layout != H5D_CHUNKED)
    throw_invalid(e.label + " has an unknown storage layout");
  if (H5Pget_external_count(dcpl.get()) != 0)
    throw_invalid(e.label + " uses external storage (data in other files); not allowed");
  const Pipeline pipe = check_filters(dcpl.get(), e.label);

  std::int64_t logical = elem;
  for (std::int64_t d : dims) logical = checked_mul(logical, d, e.label + " size");
  if (layout == H5D_CONTIGUOUS) {
    if (logical == 0) return;
    const auto stored = static_cast<std::int64_t>(H5Dget_storage_size(dset));
    if (stored == 0) throw_invalid(e.label + " has no stored data (never written)");
    if (stored != logical)
      throw_invalid(e.label + " stores " + std::to_string(stored) + " bytes for " + std::to_string(logical) +
                    " bytes of data");
    return;
  }

  std::array<hsize_t, H5S_MAX_RANK> chunk{};
  const int rank = H5Pget_chunk(dcpl.get(), H5S_MAX_RANK, chunk.data());
  if (rank != static_cast<int>(dims.size()))
    throw_invalid(e.label + " has chunks of rank " + std::to_string(rank) + ", expected " + std::to_string(dims.size()));
  std::int64_t chunk_bytes = elem;
  std::int64_t chunks = 1;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    const std::int64_t limit = std::max<std::int64_t>(dims[i], 1);
    if (chunk[i] < 1 || chunk[i] > static_cast<hsize_t>(limit))
      throw_invalid(e.label + " has chunk dimension " + std::to_string(chunk[i]) + " on axis " + std::to_string(i) +
                    ", outside [1, " + std::to_string(limit) + "]");
    const auto c = static_cast<std::int64_t>(chunk[i]);
    chunk_bytes = checked_mul(chunk_bytes, c, e.label + " chunk size");
    chunks = checked_mul(chunks, (dims[i] + c - 1) / c, e.label + " chunk count");
  }
  if (chunk_bytes > kMaxChunkBytes)
    throw_invalid(e.label + " has " + std::to_string(chunk_bytes) + "-byte chunks, more than the limit " +
                  std::to_string(kMaxChunkBytes));
  if (logical == 0) return;

  check_chunks(dset, e, dims, chunk, chunk_bytes, chunks, pipe);
}

// Why an open failed, in words a user can act on.
std::string open_failure(const std::string& label) {
  const std::string detail = h5_error_detail();
  if (detail.find("signature not found") != std::string::npos) return label + ": not an HDF5 file";
  if (detail.find("truncated") != std::string::npos) return label + ": truncated HDF5 file (" + detail + ")";
  return label + ": cannot open as HDF5" + (detail.empty() ? "" : " (" + detail + ")");
}

// HDF5 looks for its superblock signature at offset 0, 512, 1024, 2048...
bool has_hdf5_signature(std::span<const std::byte> image) {
  static constexpr unsigned char kSignature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  for (std::size_t at = 0; at + sizeof kSignature <= image.size(); at = at == 0 ? 512 : at * 2)
    if (std::memcmp(image.data() + at, kSignature, sizeof kSignature) == 0) return true;
  return false;
}

struct LinkList {
  std::vector<std::string> names;
  std::string non_hard;  // first link that is not a hard link
  std::size_t max = 0;
  bool too_many = false;
};

herr_t collect_link(hid_t, const char* name, const H5L_info_t* info, void* data) {
  auto* list = static_cast<LinkList*>(data);
  if (info->type != H5L_TYPE_HARD) {
    list->non_hard = name;
    return 1;  // stop
  }
  if (list->names.size() >= list->max) {
    list->too_many = true;
    return 1;
  }
  list->names.emplace_back(name);
  return 0;
}

}  // namespace

void h5_quiet() {
  static std::once_flag plugins_off;
  std::call_once(plugins_off, [] { H5PLset_loading_state(0); });
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

std::string h5_error_detail() {
  std::string detail;
  auto innermost = [](unsigned n, const H5E_error2_t* err, void* data) -> herr_t {
    if (n == 0 && err->desc != nullptr) *static_cast<std::string*>(data) = err->desc;
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost, &detail);
  H5Eclear2(H5E_DEFAULT);
  return printable(detail);
}

H5Id h5_own(hid_t id, H5Id::Closer closer, ErrorKind kind, const std::string& what) {
  if (id < 0) h5_check(-1, kind, what);
  return H5Id(id, closer);
}

void h5_check(herr_t status, ErrorKind kind, const std::string& what) {
  if (status >= 0) return;
  const std::string detail = h5_error_detail();
  throw Error(kind, detail.empty() ? what : what + " (" + detail + ")");
}

void throw_invalid(const std::string& message) { throw Error(ErrorKind::kTraceInvalid, message); }

H5Id open_file_readonly(const std::string& path) {
  h5_quiet();
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) throw Error(ErrorKind::kIo, "'" + path + "': no such file");
  if (!std::filesystem::is_regular_file(status)) throw Error(ErrorKind::kIo, "'" + path + "': not a regular file");
  if (std::filesystem::file_size(path, ec) == 0 && !ec) throw Error(ErrorKind::kIo, "'" + path + "': empty file");
  H5Id fapl = h5_own(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, ErrorKind::kInternal, "file access properties");
  h5_check(H5Pset_file_locking(fapl.get(), false, true), ErrorKind::kInternal, "disable file locking");
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get());
  if (id < 0) throw Error(ErrorKind::kIo, open_failure("'" + path + "'"));
  return H5Id(id, H5Fclose);
}

H5Id open_file_image(std::span<const std::byte> image, const std::string& label) {
  h5_quiet();
  if (image.empty()) throw Error(ErrorKind::kIo, label + ": empty file image");
  // H5LTopen_file_image leaves no error stack behind, so say what we can here.
  if (!has_hdf5_signature(image)) throw Error(ErrorKind::kIo, label + ": not an HDF5 file");
  // DONT_COPY | DONT_RELEASE: HDF5 reads the caller's bytes in place and never
  // frees them; without OPEN_RW it never writes them either.
  const hid_t id = H5LTopen_file_image(const_cast<std::byte*>(image.data()), image.size(),
                                       H5LT_FILE_IMAGE_DONT_COPY | H5LT_FILE_IMAGE_DONT_RELEASE);
  if (id < 0) throw Error(ErrorKind::kIo, label + ": cannot open as HDF5 (corrupt or truncated image)");
  return H5Id(id, H5Fclose);
}

std::optional<H5Id> open_child(hid_t parent, const std::string& name, ObjectKind kind, const std::string& label) {
  const htri_t exists = H5Lexists(parent, name.c_str(), H5P_DEFAULT);
  if (exists < 0) h5_check(-1, ErrorKind::kTraceInvalid, label + ": cannot look it up");
  if (exists == 0) return std::nullopt;
  H5L_info_t info{};
  h5_check(H5Lget_info(parent, name.c_str(), &info, H5P_DEFAULT), ErrorKind::kTraceInvalid,
           label + ": cannot read its link");
  if (info.type != H5L_TYPE_HARD) {
    const char* what = info.type == H5L_TYPE_SOFT ? "a soft link" : info.type == H5L_TYPE_EXTERNAL ? "an external link"
                                                                                                   : "a user-defined link";
    throw_invalid(label + " is " + what + "; only hard links are allowed");
  }
  H5Id obj = h5_own(H5Oopen(parent, name.c_str(), H5P_DEFAULT), H5Oclose, ErrorKind::kTraceInvalid,
                    label + ": cannot open it");
  const H5I_type_t type = H5Iget_type(obj.get());
  const H5I_type_t want = kind == ObjectKind::kGroup ? H5I_GROUP : H5I_DATASET;
  if (type != want)
    throw_invalid(label + " is " + (type == H5I_GROUP ? "a group" : type == H5I_DATASET ? "a dataset" : "a named datatype") +
                  ", expected " + (kind == ObjectKind::kGroup ? "a group" : "a dataset"));
  return obj;
}

H5Id require_child(hid_t parent, const std::string& name, ObjectKind kind, const std::string& label) {
  std::optional<H5Id> obj = open_child(parent, name, kind, label);
  if (!obj) throw_invalid(label + " is missing");
  return std::move(*obj);
}

std::vector<std::string> child_names(hid_t group, std::size_t max_links, const std::string& label) {
  LinkList list;
  list.max = max_links;
  hsize_t index = 0;
  h5_check(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, &index, collect_link, &list), ErrorKind::kTraceInvalid,
           label + ": cannot list its members");
  if (!list.non_hard.empty())
    throw_invalid(label + "/" + printable(list.non_hard) + " is not a hard link; only hard links are allowed");
  if (list.too_many) throw_invalid(label + " has more than " + std::to_string(max_links) + " members");
  return list.names;
}

std::optional<std::int64_t> read_int_attr(hid_t obj, const char* name, const std::string& owner) {
  const std::string what = owner + " attribute '" + name + "'";
  std::optional<H5Id> attr = open_scalar_attr(obj, name, what);
  if (!attr) return std::nullopt;
  H5Id type = attr_type(attr->get(), what);
  const H5T_class_t cls = H5Tget_class(type.get());
  if (cls != H5T_INTEGER) throw_invalid(what + " has " + type_class_name(cls) + " type, expected an integer");
  // Only the standard integer types: their conversion to int64 is HDF5's simplest path.
  if (!equal_to_any(type.get(), {H5T_STD_I8LE, H5T_STD_I16LE, H5T_STD_I32LE, H5T_STD_I64LE, H5T_STD_U8LE,
                                 H5T_STD_U16LE, H5T_STD_U32LE, H5T_STD_I8BE, H5T_STD_I16BE, H5T_STD_I32BE,
                                 H5T_STD_I64BE, H5T_STD_U8BE, H5T_STD_U16BE, H5T_STD_U32BE}))
    throw_invalid(what + " has a non-standard integer type (only 8 to 64-bit signed, 8 to 32-bit unsigned)");
  std::int64_t value = 0;
  h5_check(H5Aread(attr->get(), H5T_NATIVE_INT64, &value), ErrorKind::kTraceInvalid, what + ": cannot read it");
  return value;
}

std::optional<double> read_float_attr(hid_t obj, const char* name, const std::string& owner) {
  const std::string what = owner + " attribute '" + name + "'";
  std::optional<H5Id> attr = open_scalar_attr(obj, name, what);
  if (!attr) return std::nullopt;
  H5Id type = attr_type(attr->get(), what);
  const H5T_class_t cls = H5Tget_class(type.get());
  if (cls != H5T_FLOAT && cls != H5T_INTEGER)
    throw_invalid(what + " has " + type_class_name(cls) + " type, expected a number");
  if (!equal_to_any(type.get(), {H5T_IEEE_F32LE, H5T_IEEE_F64LE, H5T_IEEE_F32BE, H5T_IEEE_F64BE, H5T_STD_I32LE,
                                 H5T_STD_I64LE, H5T_STD_I32BE, H5T_STD_I64BE}))
    throw_invalid(what + " has a non-standard numeric type (only IEEE float32/float64 or int32/int64)");
  double value = 0.0;
  h5_check(H5Aread(attr->get(), H5T_NATIVE_DOUBLE, &value), ErrorKind::kTraceInvalid, what + ": cannot read it");
  return value;
}

std::optional<std::string> read_string_attr(hid_t obj, const char* name, const std::string& owner) {
  const std::string what = owner + " attribute '" + name + "'";
  std::optional<H5Id> attr = open_scalar_attr(obj, name, what);
  if (!attr) return std::nullopt;
  H5Id type = attr_type(attr->get(), what);
  const H5T_class_t cls = H5Tget_class(type.get());
  if (cls != H5T_STRING) throw_invalid(what + " has " + type_class_name(cls) + " type, expected a string");
  std::string value;
  const htri_t variable = H5Tis_variable_str(type.get());
  if (variable < 0) h5_check(-1, ErrorKind::kTraceInvalid, what + ": cannot read its type");
  if (variable > 0) {
    // h5py's default for str. Read with the file's own type: no conversion.
    char* text = nullptr;
    h5_check(H5Aread(attr->get(), type.get(), &text), ErrorKind::kTraceInvalid, what + ": cannot read it");
    if (text != nullptr) {
      value.assign(text, strnlen(text, kMaxStringBytes + 1));
      H5free_memory(text);
    }
  } else {
    const std::size_t size = H5Tget_size(type.get());
    if (size == 0 || size > kMaxStringBytes)
      throw_invalid(what + " is a " + std::to_string(size) + "-byte string, longer than the limit " +
                    std::to_string(kMaxStringBytes));
    std::vector<char> buffer(size + 1, '\0');
    h5_check(H5Aread(attr->get(), type.get(), buffer.data()), ErrorKind::kTraceInvalid, what + ": cannot read it");
    value.assign(buffer.data(), strnlen(buffer.data(), size));
  }
  if (value.size() > kMaxStringBytes)
    throw_invalid(what + " is longer than the limit " + std::to_string(kMaxStringBytes) + " bytes");
  return value;
}

std::int64_t require_int_attr(hid_t obj, const char* name, const std::string& owner) {
  std::optional<std::int64_t> v = read_int_attr(obj, name, owner);
  if (!v) throw_invalid(owner + " attribute '" + name + "' is missing");
  return *v;
}

double require_float_attr(hid_t obj, const char* name, const std::string& owner) {
  std::optional<double> v = read_float_attr(obj, name, owner);
  if (!v) throw_invalid(owner + " attribute '" + name + "' is missing");
  return *v;
}

std::string require_string_attr(hid_t obj, const char* name, const std::string& owner) {
  std::optional<std::string> v = read_string_attr(obj, name, owner);
  if (!v) throw_invalid(owner + " attribute '" + name + "' is missing");
  return *v;
}

void write_int_attr(hid_t obj, const char* name, std::int64_t value) {
  write_attr(obj, name, H5T_STD_I64LE, &value);
}

void write_float_attr(hid_t obj, const char* name, double value) {
  write_attr(obj, name, H5T_IEEE_F64LE, &value);
}

void write_string_attr(hid_t obj, const char* name, const std::string& value) {
  const std::string what = std::string("cannot write attribute '") + name + "'";
  H5Id type = h5_own(H5Tcopy(H5T_C_S1), H5Tclose, ErrorKind::kIo, what);
  h5_check(H5Tset_size(type.get(), value.size() + 1), ErrorKind::kIo, what);
  h5_check(H5Tset_strpad(type.get(), H5T_STR_NULLTERM), ErrorKind::kIo, what);
  write_attr(obj, name, type.get(), value.c_str());
}

H5Id create_group(hid_t parent, const std::string& name, const std::string& label) {
  const std::string what = "cannot create group " + label;
  // No modification times in object headers: the same content gives the same bytes.
  H5Id gcpl = h5_own(H5Pcreate(H5P_GROUP_CREATE), H5Pclose, ErrorKind::kIo, what);
  h5_check(H5Pset_obj_track_times(gcpl.get(), false), ErrorKind::kIo, what);
  return h5_own(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT), H5Gclose, ErrorKind::kIo, what);
}

std::vector<std::int64_t> check_dataset(hid_t dset, const DatasetExpect& expect) {
  std::vector<std::int64_t> dims = check_space(dset, expect);
  check_type(dset, expect);
  check_storage(dset, expect, dims, static_cast<std::int64_t>(H5Tget_size(expect.type)));
  return dims;
}

void read_raw(hid_t dset, hid_t type, void* buffer, const std::string& label) {
  h5_check(H5Dread(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer), ErrorKind::kIo, label + ": cannot read data");
}

std::int64_t checked_mul(std::int64_t a, std::int64_t b, const std::string& what) {
  std::int64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) throw_invalid(what + " overflows 64 bits");
  return out;
}

}  // namespace kvscope::traces::detail
