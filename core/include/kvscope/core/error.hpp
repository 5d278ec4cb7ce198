// Typed errors. Every failure the user can cause maps to one ErrorKind, one
// message naming the problem, and one documented process exit code (README).
#pragma once

#include <stdexcept>
#include <string>

namespace kvscope {

enum class ErrorKind {
  kUsage = 2,          // bad command line: unknown flag, unknown method, bad number
  kTraceInvalid = 3,   // the trace file violates schema v1 (shape, dtype, attribute...)
  kIo = 4,             // cannot open, read or write a file
  kBadNumber = 5,      // NaN/Inf where the policy rejects it
  kImpossibleBudget = 6,  // a budget the method cannot honour
  kInvariant = 7,      // a plan broke its method's law: a bug, never user error
  kInternal = 70,      // anything else
};

/// The one exception type kvscope throws on purpose. `what()` is the message.
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }
  int exit_code() const noexcept { return static_cast<int>(kind_); }

 private:
  ErrorKind kind_;
};

/// Short name of an error kind, used as the message prefix by the CLI.
inline const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kUsage: return "usage error";
    case ErrorKind::kTraceInvalid: return "invalid trace";
    case ErrorKind::kIo: return "I/O error";
    case ErrorKind::kBadNumber: return "bad number";
    case ErrorKind::kImpossibleBudget: return "impossible budget";
    case ErrorKind::kInvariant: return "invariant violated";
    case ErrorKind::kInternal: return "internal error";
  }
  return "error";
}

}  // namespace kvscope
