"""The Triton ``round_to_vocab`` kernel (under ``TRITON_INTERPRET=1`` on the CPU) against the
PyTorch reference: every dtype, awkward shapes, ties, vocabulary splits, poisoned outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fastdia import ops
from fastdia.errors import ConfigError
from fastdia.ops.rounding import round_to_vocab_reference

kernel = pytest.importorskip("fastdia.kernels.round_to_vocab")

pytestmark = pytest.mark.filterwarnings(  # numpy noise from the Triton interpreter
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = -7


def _data(n_shape, v, d, dtype, *, seed=0, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*n_shape, d, generator=gen).to(dtype)
    weight = torch.randn(v, d, generator=gen).to(dtype)
    bias = torch.randn(v, generator=gen) if with_bias else None
    return z, weight, bias


def _check(z, weight, bias, **kw):
    """Run the kernel with poisoned outputs; compare with the reference; return the ids."""
    lead, d = z.shape[:-1], weight.shape[1]
    out = torch.full(lead, SENTINEL, dtype=torch.int64)
    out_emb = torch.full((*lead, d), float("nan"), dtype=weight.dtype)
    ids, emb = kernel.round_to_vocab(
        z, weight, bias, return_embeddings=True, out=out, out_embeddings=out_emb, **kw
    )
    assert ids.data_ptr() == out.data_ptr() and emb.data_ptr() == out_emb.data_ptr()
    assert ids.shape == lead and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < weight.shape[0])).all(), "an id was not written"
    ref = round_to_vocab_reference(z, weight, bias)
    differing, bad = kernel.rounding_mismatches(z, weight, bias, ids, ref)
    assert bad == 0, f"{bad} of {differing} differing rows are not near ties"
    assert differing <= max(1, ids.numel() // 100)
    assert emb.dtype == weight.dtype and torch.equal(emb, weight[ids])  # bit-exact gather
    plain = kernel.round_to_vocab(z, weight, bias, **kw)  # no embeddings: direct path
    assert torch.equal(plain, ids)
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("splits", [None, 3], ids=["auto_split", "3_splits"])
def test_matches_reference(dtype, with_bias, splits):
    z, weight, bias = _data((2, 37), 3001, 48, dtype, seed=1, with_bias=with_bias)
    _check(z, weight, bias, num_splits=splits)


@pytest.mark.parametrize(
    ("n_shape", "v", "d"),
    [((1,), 1000, 577), ((5,), 17, 3), ((1, 1), 1, 16), ((130,), 1500, 1)],
    ids=["N1_d577", "V17_d3", "V1", "N130_d1"],
)
def test_awkward_shapes(n_shape, v, d):
    z, weight, bias = _data(n_shape, v, d, torch.float32, seed=2)
    _check(z, weight, bias, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_smollm2_vocabulary_small_n(dtype):
    """V = 49152 (SmolLM2's vocabulary) with a few rows, split and unsplit."""
    z, weight, bias = _data((3,), 49152, 64, dtype, seed=3)
    z[0] = weight[40000].float() * 3  # a clear winner far into the vocabulary
    ids = _check(z, weight, bias, num_splits=4 if dtype == torch.float32 else None)
    assert ids[0] == 40000


@pytest.mark.parametrize("splits", [1, 5])
def test_ties_go_to_the_lowest_id(splits):
    """Duplicate rows inside one tile, across tiles and across splits (tiles of 1024 under
    the interpreter): the lowest id wins, as with torch.argmax."""
    d, v = 16, 5000
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(v, d, generator=gen) * 0.1
    a, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    weight[[700, 900, 1100, 4500]] = a  # same tile, next tile / split, last split
    weight[[2100, 4100]] = b  # only in later splits
    weight[[1500, 3000]] = -a  # across tiles of one program when unsplit
    z = torch.stack([a * 10, b * 10, -a * 10, torch.zeros(d)])
    ids = kernel.round_to_vocab(z, weight, num_splits=splits)
    assert ids.tolist() == [700, 2100, 1500, 0]
    assert torch.equal(ids, round_to_vocab_reference(z, weight))


@pytest.mark.parametrize("d", [48, 50], ids=["d48_even_chunks", "d50_masked_chunk"])
@pytest.mark.parametrize("splits", [1, 3])
def test_gpu_like_tiles(monkeypatch, d, splits):
    """The GPU's small tiles (several d chunks per vocabulary tile, many vocabulary tiles
    per program, row tiles) instead of the interpreter's one-chunk tiles."""
    monkeypatch.setattr(
        kernel, "_interpreter_meta", lambda n, d: {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16}
    )
    z, weight, bias = _data((37,), 300, d, torch.float32, seed=7)
    weight[[40, 41, 250]] = weight[5].clone()  # ties across tiles and splits
    z[0] = weight[5] * 4
    ids = _check(z, weight, bias, num_splits=splits)
    if bias is not None:
        assert ids[0] in (5, 40, 41, 250)
    ids = kernel.round_to_vocab(z, weight, num_splits=splits)
    assert ids[0] == 5
    assert torch.equal(ids, round_to_vocab_reference(z, weight))


def test_mixed_operand_dtypes_are_upcast():
    z, weight, bias = _data((9,), 700, 40, torch.float32, seed=5)
    _check(z, weight.bfloat16(), bias)
    _check(z.half(), weight, bias)


def test_rejects_unsupported_dtypes_with_the_fix():
    with pytest.raises(ConfigError, match=r"z\.float\(\)"):
        kernel.round_to_vocab(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(3, 4))
    with pytest.raises(ConfigError, match=r"need z \[\.\.\., d\]"):
        kernel.round_to_vocab(torch.zeros(2, 4), torch.zeros(3, 5))


def test_public_entry_point_dispatches_to_triton():
    z, weight, bias = _data((4, 3), 300, 24, torch.float32, seed=6)
    got, emb = ops.round_to_vocab(z, weight, bias, return_embeddings=True, backend="triton")
    want = ops.round_to_vocab(z, weight, bias, backend="reference")
    assert torch.equal(got, want) and torch.equal(emb, weight[want])


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    n=st.integers(1, 40),
    v=st.integers(1, 2600),
    d=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    splits=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_property_matches_reference(n, v, d, dtype, with_bias, splits, seed):
    z, weight, bias = _data((n,), v, d, dtype, seed=seed, with_bias=with_bias)
    _check(z, weight, bias, num_splits=splits)
