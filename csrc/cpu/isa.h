// The instruction-set level the CPU kernels may use, one switch for all of them.
//
// Levels, each implying the ones below it: base (portable loops / ATen), avx2 (AVX2 + FMA: the AMD machines some
// CI runs on), avx512 (F/BW/VL/DQ + FMA), avx512_bf16 (+ AVX512-BF16: AMD Zen 4, Intel Cooper Lake+), amx (+ AMX-BF16
// tiles and the OS's permission for the tile state: Intel Sapphire Rapids+). cpu_isa() is the highest level this
// CPU supports, read once from CPUID, capped by the environment variable LOWRANK_MAX_CPU_ISA (one of the names
// above; read once, at the first kernel call), so that one AMX machine runs and tests the paths every other CPU
// takes. The cap can only lower the level. An unknown value, or one of the retired per-kernel switches
// (LOWRANK_DISABLE_AMX, LOWRANK_DISABLE_AVX512, LOWRANK_SPARSE_ISA), raises a ValueError naming the valid values
// instead of being ignored.
#pragma once

namespace lowrank::cpu {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

CpuIsa cpu_isa();
const char* isa_name(CpuIsa isa);

// Whether CPUID names an Intel CPU. Not an instruction-set question: it picks between GEMM libraries whose speed
// depends on the vendor (MKL's fp32 sgemm, which F.linear takes, is Intel's own; on AMD oneDNN's kernels are faster).
bool is_intel_cpu();

}  // namespace lowrank::cpu
