"""Builds ``model._C``: the multi-scale deformable attention op from ``csrc/``.

The CPU kernels are always built. The CUDA kernels are built as well when a CUDA toolkit is
found (``CUDA_HOME`` or nvcc on the PATH), or when ``PANORAY_CUDA=1``; ``PANORAY_CUDA=0``
turns them off. ``PANORAY_CUDA_ARCH`` sets the architectures (default ``8.0;9.0``).
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("PANORAY_CUDA")
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "no")
    return cpp_extension.CUDA_HOME is not None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    # torch 2.14's headers need C++20. ISO mode turns off FMA contraction, which the kernels'
    # inner loops want (the AVX2 + FMA variants are chosen at run time, never -march=native).
    cxx_flags = [
        "-O3",
        "-std=c++20",
        "-ffp-contract=fast",
        "-fopenmp",
        "-DPy_LIMITED_API=0x030A0000",
    ]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    define_macros = []
    if not _want_cuda():
        return [
            cpp_extension.CppExtension(
                "model._C",
                sources,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("PANORAY_CUDA_ARCH", "8.0;9.0"))
    define_macros.append(("PANORAY_WITH_CUDA", None))
    return [
        cpp_extension.CUDAExtension(
            "model._C",
            sources + _sources("csrc/cuda/*.cu"),
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
