// Host-side helpers of the CUDA backend: whether a device is present (GPU
// tests skip with the reason when not), its name, and a device buffer that
// frees itself. No CUDA header needed to use them.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace kvscope::opt::cuda {

/// True when a CUDA device can be used; otherwise false and `why` says why
/// (no driver, no device, ...), in CUDA's words.
bool device_available(std::string* why = nullptr);
/// "NVIDIA H100 80GB HBM3 (sm_90)" of the current device.
std::string device_name();
/// Waits for all work on the device; throws Error(kInternal) on a kernel fault.
void synchronize();

/// Device memory of `bytes` bytes (cudaMalloc), freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return p_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  std::size_t bytes() const { return bytes_; }
  void upload(const void* host, std::size_t bytes);
  void download(void* host, std::size_t bytes) const;
  /// Fills every byte with `value` (0xff makes fp32/fp16/bf16 NaNs: poisoning).
  void fill(int value);

  /// A buffer holding a copy of `v`.
  template <class T>
  static DeviceBuffer from(const std::vector<T>& v) {
    DeviceBuffer b(v.size() * sizeof(T));
    b.upload(v.data(), v.size() * sizeof(T));
    return b;
  }
  /// Its contents as n elements of T.
  template <class T>
  std::vector<T> to_vector(std::size_t n) const {
    std::vector<T> v(n);
    download(v.data(), n * sizeof(T));
    return v;
  }

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace kvscope::opt::cuda
