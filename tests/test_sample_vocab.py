"""``sample_vocab`` (the decode's Gumbel-max draw): every registered variant on every device
it runs on against the PyTorch reference (tests/variants.py): every dtype, odd shapes, a
``[V]``, ``[N, V]`` or no bias, seed and step as Python ints or device tensors, the public
entry point, and the errors. The reference's own properties (the softmax distribution,
the noise numbering) are tested in tests/test_decode.py.

The Triton variant runs with ``precision="ieee"``. On the CPU its draws equal the
reference's exactly; on a GPU a draw may differ only at a near tie of the noisy scores
(float rounding of the products and of the Gumbel noise's logarithms).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from variants import CPU, Variant, load, variant_params

from fastdia import noise, ops
from fastdia.decode import DECODE_STEP
from fastdia.errors import ConfigError
from fastdia.ops import registry
from fastdia.ops.gumbel import sample_vocab_reference
from fastdia.ops.round_to_vocab_ref import rounding_mismatches

pytestmark = pytest.mark.filterwarnings(  # numpy noise from the Triton interpreter
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
)

OP = ops.SAMPLE_VOCAB
VARIANTS = variant_params(OP)
KNOBS = {"triton": ("precision",)}
TARGETS = {  # what the registry must hand out for each backend
    "reference": "fastdia.ops.gumbel:sample_vocab_reference",
    "triton": "fastdia.kernels.sample_vocab:sample_vocab",
}


def _variant(backend: str, device: str) -> Variant:
    defaults = {"precision": "ieee"} if backend == "triton" else None
    return load(OP, backend, device, knobs=KNOBS.get(backend, ()), defaults=defaults)


def _assert_same_draws(v: Variant, got, want, z, weight, bias, seed, step):
    """Equal draws on the CPU; on a GPU, any differing row must be a near tie of the noisy
    scores ``z E^T + bias + g`` (recomputed in float64 from the same noise)."""
    assert got.dtype == torch.int64 and got.shape == want.shape
    if v.device == CPU:
        assert torch.equal(got, want)
        return
    rows = z.shape[0]
    seeds = noise.row_seeds(seed, rows, z.device)
    g = noise.gumbel_rows(seeds, step, torch.arange(weight.shape[0], device=z.device))
    noisy_bias = g.double() + (0 if bias is None else bias.double())
    differing, bad = rounding_mismatches(z, weight, noisy_bias.expand(rows, -1), got, want)
    assert bad == 0, f"{bad} of {differing} differing draws are not near ties"
    assert differing <= max(1, rows // 100)


@pytest.mark.parametrize(("n", "vocab", "dim"), [(1, 17, 3), (5, 300, 7), (19, 257, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_matches_reference(backend, device, dtype, n, vocab, dim, monkeypatch):
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    v = _variant(backend, device)
    gen = torch.Generator().manual_seed(n * vocab + dim)
    z = torch.randn(n, dim, generator=gen).to(dtype).to(device)
    weight = torch.randn(vocab, dim, generator=gen).to(dtype).to(device)
    bias = torch.randn(vocab, generator=gen).to(device)
    step = DECODE_STEP + 2
    want = sample_vocab_reference(z, weight, bias, seed=3, step=step)
    got = v(z, weight, bias, seed=3, step=step)
    _assert_same_draws(v, got, want, z, weight, bias, 3, step)
    with_tensors = v(
        z,
        weight,
        bias,
        seed=torch.tensor(3, device=device),
        step=torch.tensor(step, device=device),
    )
    assert torch.equal(with_tensors, got)
    rows_bias = torch.randn(n, vocab, generator=gen).to(device)  # one bias row per query
    got_rows = v(z, weight, rows_bias, seed=3, step=9)
    want_rows = sample_vocab_reference(z, weight, rows_bias, seed=3, step=9)
    _assert_same_draws(v, got_rows, want_rows, z, weight, rows_bias, 3, 9)
    no_bias = v(z, weight, None, seed=3, step=4)
    want_no_bias = sample_vocab_reference(z, weight, None, seed=3, step=4)
    _assert_same_draws(v, no_bias, want_no_bias, z, weight, None, 3, 4)
    # the registry routes backend= to the variant
    module, name = TARGETS[backend].split(":")
    assert registry.get(OP, backend) is getattr(importlib.import_module(module), name)
    public = ops.sample_vocab(z, weight, bias, seed=3, step=step, backend=backend)
    assert torch.equal(public, v.fn(z, weight, bias, seed=3, step=step))


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_errors_name_the_problem(backend, device):
    v = _variant(backend, device)
    weight = torch.zeros(4, 3, device=device)
    with pytest.raises(ConfigError, match=r"z \[N, d\]"):
        v(torch.zeros(3, device=device), weight, seed=0, step=0)
    with pytest.raises(ConfigError, match=r"bias must be \[V=4\] or \[N=2, V=4\]"):
        v(
            torch.zeros(2, 3, device=device),
            weight,
            torch.zeros(3, 4, device=device),
            seed=0,
            step=0,
        )
    with pytest.raises(ConfigError, match="seed must be one seed or one per row"):
        seeds = torch.zeros(3, dtype=torch.int64, device=device)
        v(torch.zeros(2, 3, device=device), weight, seed=seeds, step=0)
