"""Builds the optional native extensions; everything else is in pyproject.toml.

The CUDA extension (csrc/cuda) is built only when torch has CUDA and nvcc is found; the CPU extension
(csrc/cpu) only when VLLM_KVQ_BUILD_CPU=1. Without them the package runs on Triton or the reference ops.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda and cpp_extension.CUDA_HOME and os.path.isdir("csrc/cuda"):
        srcs = sorted(os.path.join("csrc/cuda", f) for f in os.listdir("csrc/cuda") if f.endswith((".cu", ".cpp")))
        if srcs:
            ext_modules.append(cpp_extension.CUDAExtension(
                "vllm_kvq._C", srcs, include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))
    elif os.environ.get("VLLM_KVQ_BUILD_CPU") == "1" and os.path.isdir("csrc/cpu"):
        srcs = sorted(os.path.join("csrc/cpu", f) for f in os.listdir("csrc/cpu") if f.endswith(".cpp"))
        if srcs:
            ext_modules.append(cpp_extension.CppExtension(
                "vllm_kvq._C_cpu", srcs, include_dirs=[os.path.abspath("csrc")], extra_compile_args=["-O3"]))
    if ext_modules:
        cmdclass["build_ext"] = cpp_extension.BuildExtension
except ImportError:
    pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)
