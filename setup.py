"""Builds jprune's optional CPU kernel, ``jprune._cpu_select`` (an XLA FFI handler, C++17).

Everything else is in pyproject.toml. The FFI headers come from jaxlib (a build requirement). The
extension is optional: without a compiler (or without jaxlib at build time) the install goes on,
and jprune selects with XLA alone.
"""

import importlib.util
import os

from setuptools import Extension, setup

jaxlib = importlib.util.find_spec("jaxlib")  # jax.ffi.include_dir(), found without importing jax
kernel = Extension(
    "jprune._cpu_select",
    ["jprune/_cpu_select.cc"],
    include_dirs=[os.path.join(os.path.dirname(jaxlib.origin), "include")] if jaxlib else [],
    extra_compile_args=["-std=c++17", "-O3"],
    language="c++",
    optional=True,
)
setup(ext_modules=[kernel] if jaxlib else [])
