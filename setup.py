"""Build the compiled hot path, fastrelay._core.

FASTRELAY_DEBUG=1 builds with -O0 -g, line tracing, annotation and the
invariant checks compiled in (as asyncpg and httptools do).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTRELAY_DEBUG") == "1"

compile_args = ["-O0", "-g"] if DEBUG else ["-O2"]
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []

extensions = [
    Extension(
        "fastrelay._core",
        ["fastrelay/_core.pyx"],
        extra_compile_args=compile_args,
        define_macros=macros,
        libraries=["z"],   # zlib's crc32 for the spool's records (commit_records)
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        annotate=DEBUG,
        compiler_directives={
            "language_level": "3",
            "boundscheck": DEBUG,
            "wraparound": False,
            "linetrace": DEBUG,
        },
        compile_time_env={"FASTRELAY_DEBUG": DEBUG},
    )
)
