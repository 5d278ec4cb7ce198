// HDF5 plumbing shared by the trace and plan-dump readers and writers:
// error capture, hardened opening, hard-link-only object access, typed scalar
// attributes, and the pre-read validation of a dataset's shape, type, layout,
// filters and storage. Nothing here knows the trace schema (schema.hpp does).
#pragma once

#include <hdf5.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "h5_handles.hpp"
#include "kvscope/core/error.hpp"

namespace kvscope::traces::detail {

/// Largest chunk a reader accepts, and the writers' cap on their chunks.
inline constexpr std::int64_t kMaxChunkBytes = std::int64_t{4} << 20;
/// Longest string attribute accepted.
inline constexpr std::size_t kMaxStringBytes = 4096;

/// Turns HDF5's automatic error printing off for the calling thread (error
/// stacks are per-thread in the thread-safe build) and disables filter plugins
/// for the process, so no file can make HDF5 load code. Call at every entry point.
void h5_quiet();

/// The innermost description on this thread's HDF5 error stack (what HDF5
/// noticed first); clears the stack. Empty when there is none.
std::string h5_error_detail();

/// Owns `id`, or throws Error(kind, what + ": " + HDF5's reason) when id < 0.
H5Id h5_own(hid_t id, H5Id::Closer closer, ErrorKind kind, const std::string& what);
/// Throws Error(kind, what + ": " + HDF5's reason) when status < 0.
void h5_check(herr_t status, ErrorKind kind, const std::string& what);

[[noreturn]] void throw_invalid(const std::string& message);

/// Opens an existing file read-only without file locking (replay on shared
/// filesystems); kIo naming the path and HDF5's reason.
H5Id open_file_readonly(const std::string& path);
/// Opens an in-memory file image read-only, without copying it.
H5Id open_file_image(std::span<const std::byte> image, const std::string& label);

enum class ObjectKind { kGroup, kDataset };

/// Opens the child `name` (a single path component) of `parent` when it
/// exists. Only a hard link to an object of `kind` is accepted: soft and
/// external links would let a file point anywhere. `label` names it in messages.
std::optional<H5Id> open_child(hid_t parent, const std::string& name, ObjectKind kind,
                               const std::string& label);
/// Same, but absence is an error ("<label> is missing").
H5Id require_child(hid_t parent, const std::string& name, ObjectKind kind, const std::string& label);

/// Names of the hard links in a group, at most `max_links` of them.
std::vector<std::string> child_names(hid_t group, std::size_t max_links, const std::string& label);

// Scalar attributes: a scalar (or one-element) dataspace of a standard integer,
// IEEE float, or string type; anything else is kTraceInvalid. `owner` names the
// object in messages ("trace.h5: root").
std::optional<std::int64_t> read_int_attr(hid_t obj, const char* name, const std::string& owner);
std::optional<double> read_float_attr(hid_t obj, const char* name, const std::string& owner);
std::optional<std::string> read_string_attr(hid_t obj, const char* name, const std::string& owner);
std::int64_t require_int_attr(hid_t obj, const char* name, const std::string& owner);
double require_float_attr(hid_t obj, const char* name, const std::string& owner);
std::string require_string_attr(hid_t obj, const char* name, const std::string& owner);

// Writers store int64 LE, float64 LE and fixed-length null-terminated strings.
void write_int_attr(hid_t obj, const char* name, std::int64_t value);
void write_float_attr(hid_t obj, const char* name, double value);
void write_string_attr(hid_t obj, const char* name, const std::string& value);

H5Id create_group(hid_t parent, const std::string& name, const std::string& label);

/// One dimension of an expected dataset: an exact size (size >= 0) or any
/// size up to `max` (size < 0). `noun` and `expected` word the message:
/// "<label> has 3 heads, expected kv_heads = 2".
struct Axis {
  std::int64_t size = -1;
  std::int64_t max = 0;
  const char* noun = "elements";
  std::string expected;
};

struct DatasetExpect {
  std::string label;       // "trace.h5: layer 2: prefill/k"
  hid_t type = -1;         // canonical file type; data is read with it, so no conversion runs
  std::string type_name;   // "float16", "int64"...
  std::vector<Axis> axes;
};

/// Validates an open dataset before any data is read: simple dataspace, rank,
/// dims, datatype (exactly the canonical type), layout (contiguous or chunked,
/// no external storage), filters (deflate, shuffle, fletcher32), chunk size
/// and stored size. Returns the dims. Throws kTraceInvalid.
std::vector<std::int64_t> check_dataset(hid_t dset, const DatasetExpect& expect);

/// Reads a whole dataset as raw elements of `type` into `buffer` (sized by the
/// caller from validated dims). kIo on failure (e.g. a checksum mismatch).
void read_raw(hid_t dset, hid_t type, void* buffer, const std::string& label);

/// a * b, or throws kTraceInvalid naming `what` when it overflows int64.
std::int64_t checked_mul(std::int64_t a, std::int64_t b, const std::string& what);

}  // namespace kvscope::traces::detail
