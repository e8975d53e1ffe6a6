"""Triton kernels, one module per fused op; installed as ``fastdia.kernels``.

Nothing here is imported by ``import fastdia``: each module imports triton itself and is
loaded by the op registry only when its variant is first used.
"""
