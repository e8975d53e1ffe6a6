"""The op benchmarks: one ``benchmark`` test per op x variant x shape.

Each test module names its ``OP`` and its ``CASES`` per device type; a test that takes
``device``, ``variant`` and ``case`` runs for every variant available there: the reference
on the CPU (the Triton interpreter times Python, not a kernel, so it is left out), every
registered variant on a GPU. In the plain test run and in CI the ``benchmark`` fixture runs
each once, untimed (``--benchmark-disable`` in pyproject's addopts); to time them::

    python -m pytest tests/bench --benchmark-enable                      # CPU
    TRITON_INTERPRET=0 python -m pytest tests/bench --benchmark-enable   # GPU, compiled
"""

from __future__ import annotations

import torch

from fastdia.device import triton_interpreting
from fastdia.profile import default_variants


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if not {"device", "variant", "case"} <= set(metafunc.fixturenames):
        return
    op, cases = metafunc.module.OP, metafunc.module.CASES
    params, ids = [], []
    for device in _devices():
        for variant in default_variants(op, device):
            if variant == "triton" and triton_interpreting():
                continue
            for case in cases[device]:
                params.append((device, variant, case))
                ids.append(f"{device}-{variant}-{case.label().replace(' ', '-')}")
    metafunc.parametrize(("device", "variant", "case"), params, ids=ids)
