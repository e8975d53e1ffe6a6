"""CUDA C++ sources of fastdia's ``cuda`` backend, installed as ``fastdia.csrc`` package data.

Header-only kernels (``*.cuh``), a thin torch binding per op (``*.cu``) and the op
registration (``ops.cpp``); built ahead of time by ``setup.py`` or just in time by
:mod:`fastdia.ops.cuda_build`. Nothing here is Python but this docstring.
"""
