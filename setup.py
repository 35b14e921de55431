"""Builds jprune's optional CPU kernel, ``jprune._cpu_select`` (an XLA FFI handler, C++17).

Everything else is in pyproject.toml. The extension is optional: without a compiler (or without
jaxlib's headers) the install goes on, and jprune selects with XLA alone.

Which XLA FFI headers, and why. The kernel includes only ``xla/ffi/api/ffi.h``, XLA's external FFI:
header-only, a C ABI between the kernel and jaxlib whose structs carry their sizes, and no C++
object crosses it (the kernel catches its own exceptions). The handler reports the FFI API version
of the headers it was compiled with (``XLA_FFI_API_MAJOR.MINOR`` in ``c_api.h``, sent in the
handler's metadata when jax registers it; ``register_ffi_target``'s ``api_version=1`` and
``ffi_call``'s custom-call API version 4 are the typed FFI this uses). jaxlib accepts a handler whose
version lies between its own and a minimum kept for at least 12 months (jaxlib 0.10.2: 0.1 to 0.3),
and refuses a newer one. So a kernel stays valid when jaxlib is upgraded after the build, and must
not be built with headers newer than the jaxlib that will run it. Hence the headers here are those
of the jaxlib installed where jprune is being installed (found from this interpreter's
site-packages, even inside pip's isolated build environment), and only when there is none yet
those of the build environment's jaxlib (a build requirement). ``jprune._cpu`` checks the version
again before registering the handler, and warns once, naming both versions, if it cannot be used.
"""

import os
import sysconfig
from importlib import metadata, util

from setuptools import Extension, setup

HEADERS = ("xla/ffi/api/c_api.h", "xla/ffi/api/api.h", "xla/ffi/api/ffi.h")


def jaxlib_headers():
    """(include dir, jaxlib version) of the jaxlib whose FFI headers the kernel is built with."""
    target = os.path.join(sysconfig.get_paths()["purelib"], "jaxlib")  # where jprune will run
    if os.path.exists(os.path.join(target, "include", HEADERS[0])):
        dists = metadata.distributions(path=[os.path.dirname(target)])
        version = next((d.version for d in dists if d.metadata["Name"] == "jaxlib"), "unknown")
        return os.path.join(target, "include"), version
    spec = util.find_spec("jaxlib")  # the build environment's (jax.ffi.include_dir(), without jax)
    if spec is None or spec.origin is None:
        return None, None
    include = os.path.join(os.path.dirname(spec.origin), "include")
    if not os.path.exists(os.path.join(include, HEADERS[0])):
        return None, None
    return include, metadata.version("jaxlib")


include, version = jaxlib_headers()
kernel = Extension(
    "jprune._cpu_select",
    ["jprune/_cpu_select.cc"],
    include_dirs=[include] if include else [],
    depends=[os.path.join(include, h) for h in HEADERS] if include else [],  # a new jaxlib rebuilds it
    define_macros=[("JPRUNE_JAXLIB_VERSION", f'"{version}"')],
    extra_compile_args=["-std=c++17", "-O3"],
    language="c++",
    optional=True,
)
setup(ext_modules=[kernel] if include else [])
