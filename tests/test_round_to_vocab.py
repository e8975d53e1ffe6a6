"""``round_to_vocab``: every registered variant on every device it runs on against the
PyTorch reference (tests/variants.py): every dtype, awkward and real vocabulary shapes,
ties, poisoned outputs, mixed operand dtypes, bf16 near ties, errors, a property test, the
public entry point, CUDA graphs and the compute-sanitizer's small cases; then the checks of
one backend (named ``test_triton_...``, ``test_cuda_...``): Triton's bf16 path for float32
``E`` (the cached copy, near ties re-scored, flagged rows re-scanned), its tiles and the
split count chosen from the tile that runs, the cuda op under torch.compile.

A variant's ids may differ from the reference's only at near ties of float rounding
(:func:`fastdia.ops.round_to_vocab_ref.rounding_mismatches`, docs/design.md §3).
"""

from __future__ import annotations

import gc
import importlib
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from variants import CPU, CUDA, Variant, load, variant_params

from fastdia import ops
from fastdia.errors import ConfigError
from fastdia.ops import registry
from fastdia.ops.round_to_vocab_ref import round_to_vocab_reference, rounding_mismatches

pytestmark = pytest.mark.filterwarnings(  # numpy noise from the Triton interpreter
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
)

OP = ops.ROUND_TO_VOCAB
VARIANTS = variant_params(OP)
CHECKED = variant_params(OP, backends=("triton", "cuda"))  # check their inputs
ON_CUDA = variant_params(OP, devices=(CUDA,))
KNOBS = {"triton": ("num_splits", "precision"), "cuda": ("num_splits",)}
BUFFERS = ("triton", "cuda")  # the backends that write into out= / out_embeddings=
# float32 modes besides the default (Triton: the exact ieee products besides bf16 scores)
FP32_MODES = {"triton": ({"precision": "ieee"},)}
TARGETS = {  # what the registry must hand out for each backend
    "reference": "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference",
    "triton": "fastdia.kernels.round_to_vocab:round_to_vocab",
    "cuda": "fastdia.ops.cuda_ops:round_to_vocab",
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = -7


def _variant(backend: str, device: str) -> Variant:
    return load(OP, backend, device, knobs=KNOBS.get(backend, ()))


def _data(n_shape, v, d, dtype, *, seed=0, with_bias=True, device=CPU):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*n_shape, d, generator=gen).to(dtype).to(device)
    weight = torch.randn(v, d, generator=gen).to(dtype).to(device)
    bias = torch.randn(v, generator=gen).to(device) if with_bias else None
    return z, weight, bias


def _check(v: Variant, z, weight, bias, **kw):
    """Run the variant (into poisoned buffers where it takes them), compare with the
    reference up to near ties, and return the ids."""
    lead, d = z.shape[:-1], weight.shape[1]
    if v.backend in BUFFERS:
        out = torch.full(lead, SENTINEL, dtype=torch.int64, device=z.device)
        out_emb = torch.full((*lead, d), float("nan"), dtype=weight.dtype, device=z.device)
        ids, emb = v(z, weight, bias, return_embeddings=True, out=out, out_embeddings=out_emb, **kw)
        assert ids.data_ptr() == out.data_ptr() and emb.data_ptr() == out_emb.data_ptr()
    else:
        ids, emb = v(z, weight, bias, return_embeddings=True, **kw)
    assert ids.shape == lead and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < weight.shape[0])).all(), "an id was not written"
    ref = round_to_vocab_reference(z, weight, bias)
    differing, bad = rounding_mismatches(z, weight, bias, ids, ref)
    assert bad == 0, f"{bad} of {differing} differing rows are not near ties"
    assert differing <= max(1, ids.numel() // 100)
    assert emb.dtype == weight.dtype and torch.equal(emb, weight[ids])  # bit-exact gather
    plain = v(z, weight, bias, **kw)  # no embeddings: the direct path
    assert torch.equal(plain, ids)
    if v.backend in BUFFERS:  # the functional op (no buffers) with embeddings
        functional_ids, functional_emb = v(z, weight, bias, return_embeddings=True, **kw)
        assert torch.equal(functional_ids, ids) and torch.equal(functional_emb, emb)
    return ids


@pytest.mark.parametrize("splits", [None, 1, 3], ids=["auto_split", "1_split", "3_splits"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_matches_reference(backend, device, dtype, with_bias, splits):
    v = _variant(backend, device)
    z, weight, bias = _data((2, 37), 3001, 48, dtype, seed=1, with_bias=with_bias, device=device)
    _check(v, z, weight, bias, num_splits=splits)
    if dtype == torch.float32:
        for mode in FP32_MODES.get(backend, ()):
            _check(v, z, weight, bias, num_splits=splits, **mode)


SHAPES = {  # (rows of z, V, d)
    "N1_d577": ((1,), 1000, 577),
    "V17_d3": ((5,), 17, 3),
    "V1": ((1, 1), 1, 16),
    "N130_d1": ((130,), 1500, 1),
    "N33_V17": ((33,), 17, 3),
}
GPU_SHAPES = {  # too slow for the CPU (the interpreter, or a reference of GFLOPs per call)
    "gpt2": ((300,), 50257, 768),
    "N4096": ((4096,), 4099, 576),
    "N7_V49152": ((7,), 49152, 576),
    "N4096_V49152": ((4096,), 49152, 576),
    "N5000_V3001": ((5000,), 3001, 64),
}


def _shape_params() -> list:
    """``(backend, device, n_shape, v, d)``: every variant on :data:`SHAPES`, the CUDA ones
    also on :data:`GPU_SHAPES`."""
    params = []
    for variant in VARIANTS:
        backend, device = variant.values
        shapes = {**SHAPES, **(GPU_SHAPES if device == CUDA else {})}
        for name, shape in shapes.items():
            params.append(
                pytest.param(
                    backend, device, *shape, id=f"{variant.id}-{name}", marks=variant.marks
                )
            )
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device", "n_shape", "v", "d"), _shape_params())
def test_awkward_shapes(backend, device, n_shape, v, d, dtype):
    variant = _variant(backend, device)
    z, weight, bias = _data(n_shape, v, d, dtype, seed=2, device=device)
    for splits in (None, 2, 3):
        _check(variant, z, weight, bias, num_splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_full_smollm2_vocabulary_small_n(backend, device, dtype):
    """V = 49152 (SmolLM2's vocabulary) with a few rows, split and unsplit (d = 576 on a GPU;
    64 on the CPU, where the interpreter takes seconds per call: one split count there)."""
    v = _variant(backend, device)
    d = 576 if device == CUDA else 64
    z, weight, bias = _data((3,), 49152, d, dtype, seed=3, device=device)
    z[0] = weight[40000].float() * 3  # a clear winner far into the vocabulary
    if device == CUDA:
        all_splits = (None, 4)
    else:
        all_splits = (4,) if dtype == torch.float32 else (None,)
    for splits in all_splits:
        ids = _check(v, z, weight, bias, num_splits=splits)
        assert ids[0] == 40000


def _tie_data(layout: str):
    """``(z, weight, expected ids, split counts)``: duplicate rows of ``E`` inside one tile,
    across tiles and across vocabulary splits (tiles of 128 on a GPU, 1024 under the
    interpreter); the lowest id must win, as with torch.argmax."""
    gen = torch.Generator().manual_seed(4)
    if layout == "V5000":
        d, v = 16, 5000
        weight = torch.randn(v, d, generator=gen) * 0.1
        a, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
        weight[[700, 720, 900, 1100, 4500]] = a  # same tile, next tiles / splits, last split
        weight[[2100, 4100]] = b  # only in later splits
        weight[[1500, 3000]] = -a  # across tiles of one program when unsplit
        z = torch.stack([a * 10, b * 10, -a * 10, torch.zeros(d)])
        return z, weight, [700, 2100, 1500, 0], (1, 5, None)
    d, v = 64, 50000
    weight = torch.randn(v, d, generator=gen) * 0.1
    a = torch.randn(d, generator=gen)
    weight[[700, 701, 1100, 20000, 49999]] = a
    z = torch.stack([a * 10, torch.zeros(d)])
    return z, weight, [700, 0], (None, 1, 7)


@pytest.mark.parametrize("layout", ["V5000", "V50000"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_ties_go_to_the_lowest_id(backend, device, dtype, layout):
    v = _variant(backend, device)
    z, weight, expected, all_splits = _tie_data(layout)
    z, weight = z.to(dtype).to(device), weight.to(dtype).to(device)
    for splits in all_splits:
        ids = v(z, weight, num_splits=splits)
        assert ids.tolist() == expected, splits
        assert torch.equal(ids, round_to_vocab_reference(z, weight))


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_mixed_operand_dtypes_are_upcast(backend, device):
    v = _variant(backend, device)
    z, weight, bias = _data((9,), 700, 40, torch.float32, seed=5, device=device)
    _check(v, z, weight.bfloat16(), bias)
    _check(v, z, weight.half(), bias)
    _check(v, z.half(), weight, bias)
    _check(v, z.bfloat16(), weight.half(), bias)


@pytest.mark.parametrize(("backend", "device"), CHECKED)
def test_errors_name_the_fix(backend, device):
    v = _variant(backend, device)
    with pytest.raises(ConfigError, match=r"z\.float\(\)"):
        v(
            torch.zeros(2, 4, dtype=torch.float64, device=device),
            torch.zeros(3, 4, device=device),
        )
    with pytest.raises(ConfigError, match=r"need z \[\.\.\., d\]"):
        v(torch.zeros(2, 4, device=device), torch.zeros(3, 5, device=device))
    with pytest.raises(ConfigError, match="empty"):
        v(torch.zeros(2, 4, device=device), torch.zeros(0, 4, device=device))
    with pytest.raises(ConfigError, match="num_splits"):
        v(torch.zeros(2, 8, device=device), torch.zeros(10, 8, device=device), num_splits=0)


@pytest.mark.cuda
def test_cuda_variant_rejects_cpu_tensors():
    v = _variant("cuda", CUDA)
    with pytest.raises(ConfigError, match="one CUDA device"):
        v(torch.zeros(2, 4), torch.zeros(3, 4))


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_public_entry_point_dispatches(backend, device, monkeypatch):
    """The registry resolves the backend on the device and hands out its function; the
    public op with ``backend=`` runs it."""
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    _variant(backend, device)
    module, name = TARGETS[backend].split(":")
    assert registry.get(OP, backend) is getattr(importlib.import_module(module), name)
    z, weight, bias = _data((4, 3), 300, 24, torch.float32, seed=6, device=device)
    got, emb = ops.round_to_vocab(z, weight, bias, return_embeddings=True, backend=backend)
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
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_property_matches_reference(backend, device, n, v, d, dtype, with_bias, splits, seed):
    variant = _variant(backend, device)
    z, weight, bias = _data((n,), v, d, dtype, seed=seed, with_bias=with_bias, device=device)
    _check(variant, z, weight, bias, num_splits=splits)


# ---- near ties: rows of E equal in bf16 but not in float32 ---------------------------------


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


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_near_ties_in_random_rows_match_the_float32_argmax(backend, device):
    """Many rows, each with its own bf16-equal pair or triple of rows of E."""
    v = _variant(backend, device)
    gen = torch.Generator().manual_seed(12)
    n_vocab, d, n = 3000, 64, 48
    weight = torch.randn(n_vocab, d, generator=gen) * 0.05
    z = torch.randn(n, d, generator=gen) * 0.01
    for i in range(n):
        base = torch.randn(d, generator=gen).bfloat16().float()
        ids = torch.randperm(n_vocab, generator=gen)[: 2 + i % 2].tolist()
        for row, copy in zip(ids, _bf16_equal_copies(base, len(ids)), strict=True):
            weight[row] = copy
        z[i] += base * 3
    bias = torch.randn(n_vocab, generator=gen) * 1e-4
    z, weight, bias = v.to(z, weight, bias)
    ref = round_to_vocab_reference(z, weight, bias)
    assert (_bf16_argmax(z, weight, bias) != ref).sum() > n // 4  # bf16 alone is often wrong
    for splits in (None, 4):
        assert torch.equal(v(z, weight, bias, num_splits=splits), ref)


# ---- CUDA graphs, and the compute-sanitizer's cases -----------------------------------------


@pytest.mark.parametrize(("backend", "device"), ON_CUDA)
def test_replays_in_a_cuda_graph(backend, device):
    """Captured once (into the caller's buffers where the variant takes them); a replay
    rounds the new ``z``."""
    v = _variant(backend, device)
    z, weight, bias = _data((64,), 49152, 576, torch.bfloat16, seed=6, device=device)
    ids = torch.empty(64, dtype=torch.int64, device=device)
    emb = torch.empty(64, 576, dtype=weight.dtype, device=device)

    def run():
        if v.backend in BUFFERS:
            v(z, weight, bias, return_embeddings=True, out=ids, out_embeddings=emb)
            return ids, emb
        return v(z, weight, bias, return_embeddings=True)  # outputs from the graph's pool

    run()  # warm up (loads the extension, autotunes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_ids, got_emb = run()
    z.copy_(weight[torch.arange(64, device=device) * 700] * 4)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got_ids, round_to_vocab_reference(z, weight, bias))
    assert torch.equal(got_emb, weight[got_ids])


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_every_path_on_small_shapes(backend, device):
    """Every kernel path once on small, awkward shapes: N = 1, d = 577 and d = 1 (unaligned
    loads), d = 64 (vector loads), V not a multiple of the tile, a single vocabulary entry,
    several splits, fp32/fp16/bf16. scripts/cuda_sanitize.py runs this test of the cuda
    backend under compute-sanitizer (memcheck, racecheck, synccheck)."""
    v = _variant(backend, device)
    gen = torch.Generator().manual_seed(1)
    for n, n_vocab, d in ((1, 300, 577), (130, 1, 64), (37, 1000, 1), (5, 4099, 64)):
        for dtype in DTYPES:
            z = torch.randn(n, d, generator=gen).to(dtype).to(device)
            weight = torch.randn(n_vocab, d, generator=gen).to(dtype).to(device)
            bias = torch.randn(n_vocab, generator=gen).to(device)
            z[0] = weight[n_vocab // 2] * 4  # a clear winner when d is large
            for splits in (None, 1, 3):
                ids, emb = v(z, weight, bias, return_embeddings=True, num_splits=splits)
                plain = v(z, weight, bias, num_splits=splits)
                ref = round_to_vocab_reference(z, weight, bias)
                case = ((n, n_vocab, d), dtype, splits)
                assert torch.equal(ids, plain), case
                assert torch.equal(emb, weight[ids]), case
                assert d < 64 or int(ids[0]) == int(ref[0]), case
                assert bool(((ids >= 0) & (ids < n_vocab)).all()), case


# ---- the triton backend: the bf16 path, tiles and split counts --------------------------------


@pytest.fixture
def kernel():
    """The Triton ``round_to_vocab`` modules, their kernels run by the interpreter on the
    CPU: ``entry`` (the public function), ``launch``, ``configs``, ``jit`` and ``cache``."""
    _variant("triton", CPU)
    return _triton_modules()


def _triton_modules() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        entry=importlib.import_module("fastdia.kernels.round_to_vocab"),
        launch=importlib.import_module("fastdia.kernels.round_to_vocab_launch"),
        configs=importlib.import_module("fastdia.kernels.round_to_vocab_configs"),
        jit=importlib.import_module("fastdia.kernels.round_to_vocab_jit"),
        cache=importlib.import_module("fastdia.kernels.weight_cache"),
    )


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("d", [48, 50], ids=["d48_even_chunks", "d50_masked_chunk"])
def test_triton_gpu_like_tiles(kernel, monkeypatch, d, splits):
    """The GPU's small tiles (several d chunks per vocabulary tile, many vocabulary tiles
    per program, row tiles) instead of the interpreter's one-chunk tiles."""
    monkeypatch.setattr(
        kernel.launch,
        "interpreter_meta",
        lambda n, d: {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16},
    )
    v = _variant("triton", CPU)
    z, weight, bias = _data((37,), 300, d, torch.float32, seed=7)
    weight[[40, 41, 250]] = weight[5].clone()  # ties across tiles and splits
    z[0] = weight[5] * 4
    ids = _check(v, z, weight, bias, num_splits=splits)
    if bias is not None:
        assert ids[0] in (5, 40, 41, 250)
    if splits > 1:  # the exact float32 path once
        assert torch.equal(_check(v, z, weight, bias, num_splits=splits, precision="ieee"), ids)
    ids = v(z, weight, num_splits=splits)
    assert ids[0] == 5
    assert torch.equal(ids, round_to_vocab_reference(z, weight))


def _spy(method, record):
    def wrapper(self, flags, emb):
        record(flags)
        return method(self, flags, emb)

    return wrapper


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_near_tie_of_two_is_re_scored_in_float32(kernel, monkeypatch, splits):
    z, weight, rows = _near_tie_data(2)
    ref = round_to_vocab_reference(z, weight)
    assert ref[0] == rows[1]  # the float32 argmax: the larger perturbation
    assert _bf16_argmax(z, weight, None)[0] == rows[0]  # bf16 alone gets it wrong
    rescans = []
    launch = kernel.launch.Launch
    monkeypatch.setattr(
        launch,
        "_rescan_flagged",
        _spy(launch._rescan_flagged, lambda flags: rescans.append(flags.tolist())),
    )
    ids = kernel.entry.round_to_vocab(z, weight, num_splits=splits)
    assert torch.equal(ids, ref)
    assert ids[1] == 7
    assert rescans == [[0, 0]]  # at most two ids in a window: the top-two re-score decided


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_triton_near_tie_of_three_is_re_scanned_in_float32(kernel, monkeypatch, splits, with_bias):
    """Three ids in the bf16 window: the top two of the bf16 scores (the lowest ids) do not
    hold the float32 argmax; the flagged row is re-scanned exactly."""
    z, weight, rows = _near_tie_data(3)
    bias = torch.zeros(weight.shape[0]) if with_bias else None
    ref = round_to_vocab_reference(z, weight, bias)
    assert ref[0] == rows[2] and _bf16_argmax(z, weight, bias)[0] == rows[0]
    rescans = []
    launch = kernel.launch.Launch
    monkeypatch.setattr(
        launch,
        "_rescan_flagged",
        _spy(launch._rescan_flagged, lambda flags: rescans.append(flags.tolist())),
    )
    ids, emb = kernel.entry.round_to_vocab(
        z, weight, bias, return_embeddings=True, num_splits=splits
    )
    assert torch.equal(ids, ref) and torch.equal(emb, weight[ref])
    assert rescans == [[1, 0]]  # only the near-tie row was flagged


def test_triton_real_like_rows_need_no_re_scan(kernel, monkeypatch):
    """A z near one token (as rounding sees at the end of sampling) has a clear winner: the
    window count stays at one, so nothing is re-scanned."""
    gen = torch.Generator().manual_seed(13)
    v, d, n = 4000, 576, 24
    weight = torch.randn(v, d, generator=gen)
    bias = -0.5 * weight.pow(2).sum(-1)
    ids = torch.randint(v, (n,), generator=gen)
    z = weight[ids] + 0.3 * torch.randn(n, d, generator=gen)
    rescans = []
    launch = kernel.launch.Launch
    monkeypatch.setattr(
        launch,
        "_rescan_flagged",
        _spy(launch._rescan_flagged, lambda flags: rescans.append(int(flags.sum()))),
    )
    assert torch.equal(kernel.entry.round_to_vocab(z, weight, bias, num_splits=3), ids)
    assert rescans == [0]


def test_triton_bf16_copy_is_cached_per_weight_and_version(kernel):
    cache = kernel.cache
    kernel.entry.clear_weight_cache()  # re-exported by the public module
    z, weight, bias = _data((5,), 700, 32, torch.float32, seed=14)
    first, norm = cache.bf16_weight(weight)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.bfloat16())
    torch.testing.assert_close(norm, weight.norm(dim=1).max().reshape(1), rtol=1e-5, atol=0)
    kernel.entry.round_to_vocab(z, weight, bias)
    assert cache.bf16_weight(weight)[0].data_ptr() == first.data_ptr()  # reused
    # an in-place update makes a new copy, and the rounding sees it
    weight[3] = z[0] * 10
    second, _ = cache.bf16_weight(weight)
    assert second.data_ptr() != first.data_ptr() and torch.equal(second, weight.bfloat16())
    assert kernel.entry.round_to_vocab(z, weight, bias)[0] == 3
    # a dead tensor's entry is dropped
    other = weight.clone()
    cache.bf16_weight(other)
    key = id(other)
    assert key in cache._BF16_CACHE
    del other
    gc.collect()
    assert key not in cache._BF16_CACHE
    cache.clear_weight_cache()
    assert not cache._BF16_CACHE


def test_triton_precision_argument_is_checked(kernel):
    z, weight, _ = _data((2,), 10, 8, torch.float32)
    with pytest.raises(ConfigError, match="precision must be one of bf16, tf32, tf32x3, ieee"):
        kernel.entry.round_to_vocab(z, weight, precision="fp8")
    with pytest.raises(ConfigError, match="num_splits"):
        kernel.entry.round_to_vocab(z, weight, num_splits=0)


def _cdiv(a, b):
    return -(-a // b)


def test_triton_split_count_follows_the_row_tile():
    pytest.importorskip("triton")
    split_count = _triton_modules().configs.split_count
    # 64 tokens on 132 SMs: 4 row tiles of 16 rows need fewer slices than 1 tile of 128
    assert split_count(64, 49152, 16, 128, 132) == 64  # 66 asked, 768-id slices
    assert split_count(64, 49152, 128, 128, 132) == 192
    assert split_count(8192, 49152, 128, 128, 132) == 5  # 64 row tiles
    assert split_count(65536, 49152, 128, 128, 132) == 1
    assert split_count(64, 49152, 16, 128, 1) == 1  # no GPU: one slice
    for n, v, bm, bv, sms, req in ((5, 3001, 16, 1024, 132, None), (40, 5000, 16, 64, 8, 7)):
        s = split_count(n, v, bm, bv, sms, req)
        width = _cdiv(_cdiv(v, s), bv) * bv  # what the kernel recomputes from the grid
        assert _cdiv(v, width) == s and (s - 1) * width < v  # the same S, no empty slice


def test_triton_top2_configs_keep_small_tiles():
    pytest.importorskip("triton")
    configs = _triton_modules().configs
    for wide in (False, True):
        kept = configs.candidates(configs.CONFIGS, wide, True)
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_V"] <= 128 * 128 for c in kept)
        assert all((c.kwargs["BLOCK_K"] == 32) == wide for c in kept)


class _FakeTuner:
    """Stands in for the autotuner on the CPU: runs one fixed config through the
    interpreter, calling the grid function the way ``Autotuner.run`` does."""

    def __init__(self, config, round_kernel):
        self.best_config, self.grids, self.round_kernel = config, [], round_kernel

    def __getitem__(self, grid):
        def run(*args, **flags):
            meta = dict(self.best_config.kwargs)
            self.grids.append(grid(meta))
            self.round_kernel[self.grids[-1]](
                *args, **flags, **meta, EVEN_K=args[10] % meta["BLOCK_K"] == 0
            )

        return run


@pytest.mark.parametrize("block_m", [16, 64])
def test_triton_merge_uses_the_split_count_of_the_config_that_ran(kernel, monkeypatch, block_m):
    """The GPU path (autotuner, SM count) on the CPU: 8 SMs, 40 rows. A 16-row tile gives 3
    row tiles and 6 slices, a 64-row tile 1 row tile and 16 slices; the partial buffers
    hold the most any config needs and the merge reads the slices that ran."""
    config = next(c for c in kernel.configs.CONFIGS_32 if c.kwargs["BLOCK_M"] == block_m)
    config = type(config)({**config.kwargs, "BLOCK_V": 64}, num_warps=4)
    tuner = _FakeTuner(config, kernel.jit.round_kernel)
    monkeypatch.setattr(kernel.launch, "round_tuned", tuner)
    monkeypatch.setattr(kernel.launch, "triton_interpreting", lambda: False)
    monkeypatch.setattr(kernel.launch, "sm_count", lambda device: 8)
    z, weight, bias = _data((40,), 5000, 48, torch.float32, seed=15)
    z[7] = weight[4990] * 5  # the winner in the last slice
    ids = kernel.entry.round_to_vocab(z, weight, bias, precision="ieee")
    expected = {16: 6, 64: 16}[block_m]
    assert tuner.grids == [(_cdiv(40, block_m), expected)]
    assert ids[7] == 4990
    assert torch.equal(ids, round_to_vocab_reference(z, weight, bias))


# ---- the cuda backend under torch.compile -----------------------------------------------------


@pytest.mark.cuda
def test_cuda_op_traces_under_torch_compile():
    v = _variant("cuda", CUDA)
    z, weight, bias = _data((4, 3), 300, 24, torch.float32, seed=7, device=CUDA)

    def fn(z):
        ids, emb = v.fn(z, weight, bias, return_embeddings=True)
        return ids + 1, emb * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, got_emb = compiled(z)
    want, want_emb = fn(z)
    assert torch.equal(got, want) and torch.equal(got_emb, want_emb)
