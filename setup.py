"""Builds jprune's optional CPU kernel, ``jprune._cpu_select`` (an XLA FFI handler, C++17).

Everything else is in pyproject.toml. The FFI headers come from jaxlib (a build requirement). The
extension is optional: without a compiler the install goes on, and jprune selects with XLA alone.
"""

import importlib.util
import os

from setuptools import Extension, setup


def ffi_include_dir() -> str:
    """``jax.ffi.include_dir()``, found without importing jax."""
    return os.path.join(os.path.dirname(importlib.util.find_spec("jaxlib").origin), "include")


setup(
    ext_modules=[
        Extension(
            "jprune._cpu_select",
            ["jprune/_cpu_select.cc"],
            include_dirs=[ffi_include_dir()],
            extra_compile_args=["-std=c++17", "-O3"],
            language="c++",
            optional=True,
        )
    ]
)
