"""Build greenscope's one optional extension, ``greenscope._hot``; metadata is in pyproject.toml.

``greenscope/_hot.py`` is plain Python that Cython compiles (pure-Python mode). The
extension is optional: where Cython cannot run or there is no C compiler, or on an
interpreter other than CPython, or with ``GREENSCOPE_NO_EXTENSIONS=1``, the build skips
it with a warning and the package runs ``_hot.py`` as it is, with the same behaviour.
"""

from __future__ import annotations

import os
import platform

from setuptools import Extension, setup


def _extensions() -> list[Extension]:
    skip = os.environ.get("GREENSCOPE_NO_EXTENSIONS", "").strip().lower()
    if skip not in ("", "0", "false", "no") or platform.python_implementation() != "CPython":
        return []
    try:
        from Cython.Build import cythonize  # noqa: PLC0415 - only when building it
    except ImportError:  # Cython is a build requirement; a non-isolated build may lack it
        return []
    extensions: list[Extension] = cythonize(
        [Extension("greenscope._hot", ["greenscope/_hot.py"], optional=True)],
        compiler_directives={
            "language_level": "3",
            "auto_pickle": False,
            # Its methods only read the current greenlet's dict: safe without the GIL, so
            # importing it does not turn the GIL back on in a free-threaded build.
            "freethreading_compatible": True,
        },
        quiet=True,
    )
    for extension in extensions:
        extension.optional = True  # cythonize() does not carry it over
    return extensions


setup(ext_modules=_extensions())
