"""Build script: package layout and the ``value_steer._C`` extension.

``kernels/`` and ``patches/`` install as ``value_steer.kernels`` and ``value_steer.patches``
(``kernels`` is taken on PyPI, so it must never land top-level in site-packages).

The extension is built from ``csrc/*.cpp`` (CPU implementations of the custom ops). CUDA sources in
``csrc/cuda/`` are added only where torch is a CUDA build and nvcc is found; everywhere else the CPU
extension alone is built. A failed or skipped build is not fatal: ``value_steer`` then logs one line
and falls back to the torch references (``VALUE_STEER_REQUIRE_EXT=1`` makes the build mandatory).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

PACKAGES = ["value_steer", "value_steer.kernels", "value_steer.patches"]
PACKAGE_DIR = {
    "value_steer": "value_steer",
    "value_steer.kernels": "kernels",
    "value_steer.patches": "patches",
}


def _subpackages(root: str, dotted: str) -> list[str]:
    found = []
    for init in glob.glob(os.path.join(root, "**", "__init__.py"), recursive=True):
        rel = os.path.relpath(os.path.dirname(init), root)
        if rel != ".":
            found.append(dotted + "." + rel.replace(os.sep, "."))
    return found


for _root, _dotted in list(PACKAGE_DIR.items()):
    PACKAGES += _subpackages(_dotted, _root)
    for sub in _subpackages(_dotted, _root):
        PACKAGE_DIR.setdefault(sub, os.path.join(_dotted, *sub.split(".")[len(_root.split(".")) :]))


def _extensions() -> tuple[list, dict]:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # building without torch: pure-Python install, torch fallback at runtime
        print("value_steer: torch not importable at build time; skipping value_steer._C")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    extra = {"cxx": ["-O3", "-std=c++17"]}
    use_cuda = bool(torch.version.cuda) and shutil.which("nvcc") is not None and bool(cuda_sources)
    if use_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension(
            "value_steer._C",
            sources + cuda_sources,
            extra_compile_args=extra,
            define_macros=[("VALUE_STEER_WITH_CUDA", "1")],
        )
    else:
        ext = CppExtension("value_steer._C", sources, extra_compile_args=extra)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"value_steer": ["data/**/*", "py.typed"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
