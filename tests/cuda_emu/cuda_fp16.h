// Host emulation (tests only): IEEE binary16 storage and its conversion to float.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 v;  // GCC >= 12 on x86-64: exact binary16 -> binary32
  std::memcpy(&v, &h.bits, sizeof v);
  return static_cast<float>(v);
}
