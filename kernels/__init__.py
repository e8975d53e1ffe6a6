"""Triton kernels, one module per fused op; installed as ``fastdia.kernels``.

Nothing here is imported by ``import fastdia``: each module imports triton itself and is
loaded by the op registry only when its variant is first used.

The top-level name ``kernels`` belongs to PyPI's ``kernels`` package (Hugging Face's hub
kernels, which transformers >= 5.25 installs and imports). Where a checkout's root is on
``sys.path`` (``python -m pytest`` or ``python -m benchmarks...`` run from it), this folder
would shadow that package and break ``import transformers``'s model loading; so, imported
under that name, it loads the PyPI package in its place (see :func:`_hand_over`).
"""

from __future__ import annotations


def _hand_over(name: str) -> None:
    """Replace this module in ``sys.modules`` by the ``name`` package found on ``sys.path``
    outside this checkout, or raise ModuleNotFoundError as a missing package would."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over(__name__)
