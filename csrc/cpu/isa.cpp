// CPU feature detection and the LOWRANK_MAX_CPU_ISA cap (see isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define LOWRANK_ISA_X86 1
#else
#define LOWRANK_ISA_X86 0
#endif

namespace lowrank::cpu {
namespace {

constexpr const char* kNames[] = {"base", "avx2", "avx512", "avx512_bf16", "amx"};

CpuIsa detect() {
#if LOWRANK_ISA_X86
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return CpuIsa::kBase;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return CpuIsa::kAvx2;
  if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512;
  if (!__builtin_cpu_supports("amx-bf16")) return CpuIsa::kAvx512Bf16;
  // Linux ≥ 5.16 gives a process the AMX tile state only on request (oneDNN makes the same one; repeating it is
  // harmless).
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return CpuIsa::kAvx512Bf16;
  return CpuIsa::kAmx;
#else
  return CpuIsa::kBase;
#endif
}

CpuIsa cap_from_env(CpuIsa detected) {
  for (const char* retired : {"LOWRANK_DISABLE_AMX", "LOWRANK_DISABLE_AVX512", "LOWRANK_SPARSE_ISA"}) {
    TORCH_CHECK_VALUE(std::getenv(retired) == nullptr, retired,
                      " is no longer read; set LOWRANK_MAX_CPU_ISA to one of base, avx2, avx512, avx512_bf16, amx "
                      "(e.g. LOWRANK_DISABLE_AMX=1 is LOWRANK_MAX_CPU_ISA=avx512_bf16)");
  }
  const char* cap = std::getenv("LOWRANK_MAX_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return detected;
  for (int level = 0; level <= static_cast<int>(CpuIsa::kAmx); ++level) {
    if (std::string(cap) == kNames[level])
      return level < static_cast<int>(detected) ? static_cast<CpuIsa>(level) : detected;
  }
  TORCH_CHECK_VALUE(false, "LOWRANK_MAX_CPU_ISA=", cap,
                    " is not a level; use one of base, avx2, avx512, avx512_bf16, amx");
  return detected;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = cap_from_env(detect());
  return isa;
}

const char* isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

bool is_intel_cpu() {
#if LOWRANK_ISA_X86
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

}  // namespace lowrank::cpu

// lowrank.ops._backends.cpu_isa(): the level the CPU kernels run at, for backend probes that need a given level.
TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  m.def("cpu_isa() -> str", [] { return std::string(lowrank::cpu::isa_name(lowrank::cpu::cpu_isa())); });
}
