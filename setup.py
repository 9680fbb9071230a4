"""Extension wiring only: builds lowrank._C from csrc/ (CPU always, CUDA when the installed torch has it)."""
import glob
import os
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
WITH_CUDA = torch.version.cuda is not None
# -fopenmp: at::parallel_for is header-inline and runs serially without it. torch loads its own libgomp.so.1
# first (lowrank imports torch before _C), and ours resolves to that same SONAME: one OpenMP runtime.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--threads=2",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autocast/*.cpp"))
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    ext = CUDAExtension("lowrank._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=LINK_FLAGS,
                        py_limited_api=True)
else:
    ext = CppExtension("lowrank._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                       extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS, py_limited_api=True)


def _nvcc_version() -> str | None:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip().splitlines()[-1]


with open(os.path.join(ROOT, "lowrank", "_build.py"), "w") as f:
    f.write('"""Written by setup.py at build time: what this build of lowrank._C contains."""\n')
    f.write(f"with_cuda = {WITH_CUDA!r}\n")
    f.write(f"torch_version = {torch.__version__!r}\n")
    f.write(f"torch_cuda_version = {torch.version.cuda!r}\n")
    f.write(f"nvcc_version = {_nvcc_version() if WITH_CUDA else None!r}\n")
    f.write(f"cxx_flags = {CXX_FLAGS!r}\n")
    f.write(f"cuda_arch_flags = {[f for f in NVCC_FLAGS if f.startswith('-gencode')] if WITH_CUDA else []!r}\n")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension}, options={"bdist_wheel": {"py_limited_api": "cp310"}})
