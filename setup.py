"""Builds the optional native extensions; everything else is in pyproject.toml.

- CUDA torch and nvcc present: the CUDA extension (csrc/cuda) as ``vllm_kvq._C``.
- Otherwise, on x86-64: the CPU extension (csrc/cpu, AVX-512 and portable builds chosen at run time) as
  ``vllm_kvq._C_cpu``. ``VLLM_KVQ_BUILD_CPU=0`` skips it.

Both are optional: when a build fails, the package still installs, the log says why, and the runtime uses
the next implementation (Triton, then the PyTorch reference).
"""

import os
import platform

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils import cpp_extension

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Reports a failed extension build instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing, headers mismatched, ...: the runtime falls back
                print(f"vllm_kvq: WARNING: building {ext.name} failed ({type(e).__name__}: {e}); the package "
                      f"installs without it and uses the Triton or PyTorch reference ops instead")

    def _sources(folder, suffixes):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffixes))

    if torch.version.cuda and cpp_extension.CUDA_HOME and os.path.isdir("csrc/cuda"):
        ext_modules.append(cpp_extension.CUDAExtension(
            "vllm_kvq._C", _sources("csrc/cuda", (".cu", ".cpp")), include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))
    elif (platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("VLLM_KVQ_BUILD_CPU", "1") != "0"
          and os.path.isdir("csrc/cpu")):
        # -fopenmp: at::parallel_for only runs threads when the including file is compiled with OpenMP; the
        # library it links (libgomp.so.1) is the one torch already loaded, so the threads are vLLM's.
        ext_modules.append(cpp_extension.CppExtension(
            "vllm_kvq._C_cpu", _sources("csrc/cpu", (".cpp",)), include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]))
    if ext_modules:
        cmdclass["build_ext"] = OptionalBuildExtension
except ImportError:
    pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)
