"""Build the Cython kernels in native/ into mediaserver._native.

Everything else about the package lives in pyproject.toml.  Environment:

* ``MEDIASERVER_ANNOTATE=1``  write Cython's HTML annotation next to each .pyx
* ``MEDIASERVER_ONLY=_g711,_vad``  build only these kernels (development)
* ``MEDIASERVER_NATIVE_FLAGS="-march=native"``  extra C flags for a local build
"""

import os
import shlex
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
NATIVE = "native"

# -ffp-contract=off: the resampler must give bit-identical output however the
# input is chunked, so the compiler may not fuse a*b+c differently in the
# vectorised body and the scalar tail of a loop.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
CFLAGS += shlex.split(os.environ.get("MEDIASERVER_NATIVE_FLAGS", ""))

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    # (no embedsignature: Cython 3's functions give inspect.signature() and help() their signatures themselves,
    # and an embedded copy made help() print each one twice)
}

only = {name for name in os.environ.get("MEDIASERVER_ONLY", "").split(",") if name}
sources = sorted((HERE / NATIVE).glob("_*.pyx"))
extensions = [
    Extension(
        f"mediaserver._native.{src.stem}",
        [f"{NATIVE}/{src.name}"],
        include_dirs=[NATIVE],
        extra_compile_args=CFLAGS,
    )
    for src in sources
    if not only or src.stem in only
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        include_path=[NATIVE],
        annotate=os.environ.get("MEDIASERVER_ANNOTATE") == "1",
        quiet=True,
    )
)
