"""The Triton ``round_to_vocab`` kernel (under ``TRITON_INTERPRET=1`` on the CPU) against the
PyTorch reference: every dtype, awkward shapes, ties, vocabulary splits, poisoned outputs,
the bf16 path for float32 ``E`` (cached copy, near ties re-scored, flagged rows re-scanned)
and the split count chosen from the tile that runs."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fastdia import ops
from fastdia.errors import ConfigError
from fastdia.ops.round_to_vocab_ref import round_to_vocab_reference

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
    if dtype == torch.float32:  # the exact (ieee) float32 path besides the bf16 default
        _check(z, weight, bias, num_splits=splits, precision="ieee")


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
    if splits > 1:  # the exact float32 path once
        assert torch.equal(_check(z, weight, bias, num_splits=splits, precision="ieee"), ids)
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


# ---- float32 E against a cached bf16 copy: near ties ---------------------------------------


def _bf16_argmax(z, weight, bias):
    """What rounding against bf16 copies of ``z`` and ``E`` alone would give (no re-score)."""
    scores = z.bfloat16().float() @ weight.bfloat16().float().T
    return (scores + (0 if bias is None else bias)).argmax(-1)


def _bf16_equal_copies(base, copies):
    """``copies`` rows ``base (1 + (k + 1) 0.1 2^-9)``: scaled by less than half a bf16 ulp,
    so all equal ``base`` (exact in bf16) once rounded to bf16, while in float32 each one
    scores ``z . base`` higher than the last by about ``2e-4`` relative (thousands of fp32
    ulps: no float32 near tie)."""
    return [base * (1 + (k + 1) * 0.1 * 2**-9) for k in range(copies)]


def _near_tie_data(copies, *, seed=0, v=2600, d=40, rows=(150, 1200, 2500)):
    """Rows of ``E`` equal in bf16 but not in float32: bf16 scores tie (bf16 picks the
    lowest id) while float32 ranks them by the scaling: the highest id wins."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=gen) * 0.05
    base = torch.randn(d, generator=gen).bfloat16().float()  # exact in bf16
    for row, copy in zip(rows, _bf16_equal_copies(base, copies), strict=False):
        weight[row] = copy
    weight[7] = torch.randn(d, generator=gen)  # a second row with a clear winner
    z = torch.stack([base * 4, weight[7] * 4])
    return z, weight, rows[:copies]


@pytest.mark.parametrize("splits", [1, 3])
def test_near_tie_of_two_is_re_scored_in_float32(monkeypatch, splits):
    z, weight, rows = _near_tie_data(2)
    ref = round_to_vocab_reference(z, weight)
    assert ref[0] == rows[1]  # the float32 argmax: the larger perturbation
    assert _bf16_argmax(z, weight, None)[0] == rows[0]  # bf16 alone gets it wrong
    rescans = []
    monkeypatch.setattr(
        kernel._Launch,
        "_rescan_flagged",
        _spy(kernel._Launch._rescan_flagged, lambda flags: rescans.append(flags.tolist())),
    )
    ids = kernel.round_to_vocab(z, weight, num_splits=splits)
    assert torch.equal(ids, ref)
    assert ids[1] == 7
    assert rescans == [[0, 0]]  # at most two ids in a window: the top-two re-score decided


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_near_tie_of_three_is_re_scanned_in_float32(monkeypatch, splits, with_bias):
    """Three ids in the bf16 window: the top two of the bf16 scores (the lowest ids) do not
    hold the float32 argmax; the flagged row is re-scanned exactly."""
    z, weight, rows = _near_tie_data(3)
    bias = torch.zeros(weight.shape[0]) if with_bias else None
    ref = round_to_vocab_reference(z, weight, bias)
    assert ref[0] == rows[2] and _bf16_argmax(z, weight, bias)[0] == rows[0]
    rescans = []
    monkeypatch.setattr(
        kernel._Launch,
        "_rescan_flagged",
        _spy(kernel._Launch._rescan_flagged, lambda flags: rescans.append(flags.tolist())),
    )
    ids, emb = kernel.round_to_vocab(z, weight, bias, return_embeddings=True, num_splits=splits)
    assert torch.equal(ids, ref) and torch.equal(emb, weight[ref])
    assert rescans == [[1, 0]]  # only the near-tie row was flagged


def test_near_ties_in_random_rows_match_the_float32_argmax():
    """Many rows, each with its own bf16-equal pair or triple of rows of E."""
    gen = torch.Generator().manual_seed(12)
    v, d, n = 3000, 64, 48
    weight = torch.randn(v, d, generator=gen) * 0.05
    z = torch.randn(n, d, generator=gen) * 0.01
    for i in range(n):
        base = torch.randn(d, generator=gen).bfloat16().float()
        ids = torch.randperm(v, generator=gen)[: 2 + i % 2].tolist()
        for row, copy in zip(ids, _bf16_equal_copies(base, len(ids)), strict=True):
            weight[row] = copy
        z[i] += base * 3
    bias = torch.randn(v, generator=gen) * 1e-4
    ref = round_to_vocab_reference(z, weight, bias)
    assert (_bf16_argmax(z, weight, bias) != ref).sum() > n // 4  # bf16 alone is often wrong
    for splits in (None, 4):
        assert torch.equal(kernel.round_to_vocab(z, weight, bias, num_splits=splits), ref)


def test_real_like_rows_need_no_re_scan(monkeypatch):
    """A z near one token (as rounding sees at the end of sampling) has a clear winner: the
    window count stays at one, so nothing is re-scanned."""
    gen = torch.Generator().manual_seed(13)
    v, d, n = 4000, 576, 24
    weight = torch.randn(v, d, generator=gen)
    bias = -0.5 * weight.pow(2).sum(-1)
    ids = torch.randint(v, (n,), generator=gen)
    z = weight[ids] + 0.3 * torch.randn(n, d, generator=gen)
    rescans = []
    monkeypatch.setattr(
        kernel._Launch,
        "_rescan_flagged",
        _spy(kernel._Launch._rescan_flagged, lambda flags: rescans.append(int(flags.sum()))),
    )
    assert torch.equal(kernel.round_to_vocab(z, weight, bias, num_splits=3), ids)
    assert rescans == [0]


def _spy(method, record):
    def wrapper(self, flags, emb):
        record(flags)
        return method(self, flags, emb)

    return wrapper


def test_bf16_copy_is_cached_per_weight_and_version():
    kernel.clear_weight_cache()
    z, weight, bias = _data((5,), 700, 32, torch.float32, seed=14)
    first, norm = kernel.bf16_weight(weight)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.bfloat16())
    torch.testing.assert_close(norm, weight.norm(dim=1).max().reshape(1), rtol=1e-5, atol=0)
    kernel.round_to_vocab(z, weight, bias)
    assert kernel.bf16_weight(weight)[0].data_ptr() == first.data_ptr()  # reused
    # an in-place update makes a new copy, and the rounding sees it
    weight[3] = z[0] * 10
    second, _ = kernel.bf16_weight(weight)
    assert second.data_ptr() != first.data_ptr() and torch.equal(second, weight.bfloat16())
    assert kernel.round_to_vocab(z, weight, bias)[0] == 3
    # a dead tensor's entry is dropped
    other = weight.clone()
    kernel.bf16_weight(other)
    key = id(other)
    assert key in kernel._BF16_CACHE
    del other
    gc.collect()
    assert key not in kernel._BF16_CACHE
    kernel.clear_weight_cache()
    assert not kernel._BF16_CACHE


def test_precision_argument_is_checked():
    z, weight, _ = _data((2,), 10, 8, torch.float32)
    with pytest.raises(ConfigError, match="precision must be one of bf16, tf32, tf32x3, ieee"):
        kernel.round_to_vocab(z, weight, precision="fp8")
    with pytest.raises(ConfigError, match="num_splits"):
        kernel.round_to_vocab(z, weight, num_splits=0)


# ---- the vocabulary split is sized from the tile that runs ---------------------------------


def _cdiv(a, b):
    return -(-a // b)


def test_split_count_follows_the_row_tile():
    # 64 tokens on 132 SMs: 4 row tiles of 16 rows need fewer slices than 1 tile of 128
    assert kernel.split_count(64, 49152, 16, 128, 132) == 64  # 66 asked, 768-id slices
    assert kernel.split_count(64, 49152, 128, 128, 132) == 192
    assert kernel.split_count(8192, 49152, 128, 128, 132) == 5  # 64 row tiles
    assert kernel.split_count(65536, 49152, 128, 128, 132) == 1
    assert kernel.split_count(64, 49152, 16, 128, 1) == 1  # no GPU: one slice
    for n, v, bm, bv, sms, req in ((5, 3001, 16, 1024, 132, None), (40, 5000, 16, 64, 8, 7)):
        s = kernel.split_count(n, v, bm, bv, sms, req)
        width = _cdiv(_cdiv(v, s), bv) * bv  # what the kernel recomputes from the grid
        assert _cdiv(v, width) == s and (s - 1) * width < v  # the same S, no empty slice


def test_top2_configs_keep_small_tiles():
    for wide in (False, True):
        kept = kernel._candidates(kernel._CONFIGS, wide, True)
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_V"] <= 128 * 128 for c in kept)
        assert all((c.kwargs["BLOCK_K"] == 32) == wide for c in kept)


class _FakeTuner:
    """Stands in for the autotuner on the CPU: runs one fixed config through the
    interpreter, calling the grid function the way ``Autotuner.run`` does."""

    def __init__(self, config):
        self.best_config, self.grids = config, []

    def __getitem__(self, grid):
        def run(*args, **flags):
            meta = dict(self.best_config.kwargs)
            self.grids.append(grid(meta))
            kernel._round_kernel[self.grids[-1]](
                *args, **flags, **meta, EVEN_K=args[10] % meta["BLOCK_K"] == 0
            )

        return run


@pytest.mark.parametrize("block_m", [16, 64])
def test_merge_uses_the_split_count_of_the_config_that_ran(monkeypatch, block_m):
    """The GPU path (autotuner, SM count) on the CPU: 8 SMs, 40 rows. A 16-row tile gives 3
    row tiles and 6 slices, a 64-row tile 1 row tile and 16 slices; the partial buffers
    hold the most any config needs and the merge reads the slices that ran."""
    config = next(c for c in kernel._CONFIGS_32 if c.kwargs["BLOCK_M"] == block_m)
    config = type(config)({**config.kwargs, "BLOCK_V": 64}, num_warps=4)
    tuner = _FakeTuner(config)
    monkeypatch.setattr(kernel, "_round_tuned", tuner)
    monkeypatch.setattr(kernel, "triton_interpreting", lambda: False)
    monkeypatch.setattr(kernel, "sm_count", lambda device: 8)
    z, weight, bias = _data((40,), 5000, 48, torch.float32, seed=15)
    z[7] = weight[4990] * 5  # the winner in the last slice
    ids = kernel.round_to_vocab(z, weight, bias, precision="ieee")
    expected = {16: 6, 64: 16}[block_m]
    assert tuner.grids == [(_cdiv(40, block_m), expected)]
    assert ids[7] == 4990
    assert torch.equal(ids, round_to_vocab_reference(z, weight, bias))
