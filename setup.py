"""Build the optional compiled hot loop of the client (trame_async/_speedups.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler (or Python
headers) the build warns and installs the pure-Python package, which works the same, only slower;
TRAME_ASYNC_PURE_PYTHON=1 skips building it at all (and, at run time, skips using it).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("TRAME_ASYNC_PURE_PYTHON"):
    ext_modules.append(
        Extension("trame_async._speedups", ["trame_async/_speedups.c"], optional=True)
    )

setup(ext_modules=ext_modules)
