"""The ``cuda`` backend's kernels (csrc/) on a GPU against the PyTorch references: fresh
random inputs, awkward shapes, poisoned outputs, every dtype, ties, the same noise as the
reference, device-side counters, CUDA graphs, torch.compile and the whole sampler.

Every test here is marked ``cuda`` and skipped without a CUDA device (tests/conftest.py).
The first test builds the extension just in time unless it was installed prebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastdia import noise, ops
from fastdia.cli import main
from fastdia.errors import ConfigError
from fastdia.ops import TokenLocalStack, cuda_ops, registry
from fastdia.ops.guided_step_ref import guided_step_reference
from fastdia.ops.round_to_vocab_ref import round_to_vocab_reference

pytestmark = pytest.mark.cuda

DEV = "cuda"
# docs/design.md §3: fp32 relative error < 1e-5 (the atol covers elements near zero: the noise's
# log/cos and the critic's 3xTF32 products round differently from the reference's).
RTOL, ATOL = 1e-5, 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = -7


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build (or load) the extension once; a failure names the problem."""
    cuda_ops.load()


# ---- guided_step ----------------------------------------------------------------------------


def _stack(dim: int, hidden: int, seed: int = 0) -> TokenLocalStack:
    gen = torch.Generator().manual_seed(seed)
    return TokenLocalStack(
        w1=(torch.randn(hidden, dim, generator=gen) / dim**0.5).to(DEV),
        b1=torch.randn(hidden, generator=gen).to(DEV),
        w2=(torch.randn(hidden, generator=gen) / hidden**0.5).to(DEV),
        b2=torch.randn((), generator=gen).to(DEV),
    )


def _inputs(batch: int, length: int, dim: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n = batch * length
    return tuple(torch.randn(n, dim, generator=gen).to(dtype).to(DEV) for _ in range(3))


def _both(z, eps, coef, **kw):
    got = cuda_ops.guided_step(z, eps, coef, **kw)
    want = guided_step_reference(z, eps, coef, **kw)
    return got, want


def _coef_row() -> torch.Tensor:
    return torch.tensor([1.05, -0.3, 0.2, 0.4], device=DEV)


@pytest.mark.parametrize("per_sample", [False, True], ids=["row", "per_sample"])
@pytest.mark.parametrize("kappa", [0.0, 0.6], ids=["kappa0", "kappa"])
@pytest.mark.parametrize("with_critic", [True, False], ids=["critic", "no_critic"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("return_h", [True, False], ids=["h", "no_h"])
def test_guided_step_matches_reference(per_sample, kappa, with_critic, with_grad, return_h):
    batch, length, dim = 3, 5, 577
    z, eps, grad = _inputs(batch, length, dim, seed=1)
    coef = (torch.rand(batch, 4) + 0.1).to(DEV) if per_sample else _coef_row()
    kw = {
        "seq_len": length,
        "seed": 11,
        "step": 4,
        "guidance": 2.5,
        "critic": _stack(dim, 40) if with_critic else None,
        "grad": grad if with_grad else None,
        "noise_kappa": kappa,
        "return_h": return_h,
    }
    (out, h), (ref, ref_h) = _both(z, eps, coef, **kw)
    assert out.shape == (batch * length, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    if with_critic and return_h:
        torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)
    else:
        assert h is None


@pytest.mark.parametrize(
    ("batch", "length", "dim", "hidden"),
    [
        (1, 1, 577, 16),
        (2, 33, 48, 130),
        (1, 3, 1, 5),
        (4, 70, 24, 8),
        (2, 130, 576, 128),
        (3, 17, 576, 300),
        (1, 200, 768, 256),
    ],
    ids=["N1_d577", "L33_H130", "d1", "L70", "L130_d576", "H300", "L200_d768"],
)
def test_guided_step_awkward_shapes(batch, length, dim, hidden):
    z, eps, grad = _inputs(batch, length, dim, seed=2)
    coef = (torch.rand(batch, 4, generator=torch.Generator().manual_seed(batch)) + 0.1).to(DEV)
    for kappa, return_h in ((0.0, True), (0.3, True), (0.3, False), (0.0, False)):
        kw = {
            "seq_len": length,
            "seed": 3,
            "step": 9,
            "guidance": 1.5,
            "critic": _stack(dim, hidden, seed=1),
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        (out, h), (ref, ref_h) = _both(z, eps, coef, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h:
            torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [64, 577], ids=["d64_vec", "d577_scalar"])
def test_guided_step_half_inputs_are_upcast_like_the_reference(dtype, dim):
    z, eps, grad = _inputs(2, 6, dim, seed=3, dtype=dtype)
    for critic in (_stack(dim, 24), None):
        kw = {"seq_len": 6, "seed": 1, "step": 2, "guidance": 1.0, "critic": critic}
        (out, _), (ref, _) = _both(z, eps, _coef_row(), grad=grad, **kw)
        assert out.dtype == torch.float32
        # the operands are exact in fp32, so the result is fp32-accurate
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    mixed = {"seq_len": 6, "seed": 1, "step": 2, "guidance": 1.0, "critic": _stack(dim, 24)}
    (out, _), (ref, _) = _both(z.float(), eps, _coef_row(), grad=grad, **mixed)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kappa", [0.0, 0.4], ids=["row_tiles", "sequences"])
def test_guided_step_column_groups_give_the_same_result(kappa):
    """Phase C split over 1, 3, 5 or all column groups (phase A recomputed in each): the
    same bits, and the reference's values, in the row-tile and the per-sequence kernels."""
    batch, length, dim = 2, 70, 577
    z, eps, grad = _inputs(batch, length, dim, seed=9)
    kw = {
        "seq_len": length,
        "seed": 4,
        "step": 8,
        "guidance": 1.5,
        "critic": _stack(dim, 130),
        "grad": grad,
        "noise_kappa": kappa,
        "return_h": True,
    }
    ref, ref_h = guided_step_reference(z, eps, _coef_row(), **kw)
    first = None
    for groups in (None, 1, 3, 5, 1000):
        out, h = cuda_ops.guided_step(z, eps, _coef_row(), d_groups=groups, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)
        if first is None:
            first = (out, h)
        assert torch.equal(out, first[0]) and torch.equal(h, first[1])


def test_guided_step_writes_every_output_element():
    batch, length, dim = 3, 70, 577
    z, eps, grad = _inputs(batch, length, dim, seed=4)
    for critic, kappa, return_h in (
        (_stack(dim, 20), 0.0, False),
        (_stack(dim, 20), 0.5, True),
        (_stack(dim, 20), 0.0, True),
        (None, 0.0, False),
    ):
        out = torch.full((batch * length, dim), float("nan"), device=DEV)
        h_out = torch.full((batch,), float("nan"), device=DEV)
        kw = {
            "seq_len": length,
            "seed": 0,
            "step": 1,
            "guidance": 2.0,
            "critic": critic,
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        got, h = cuda_ops.guided_step(
            z, eps, _coef_row(), out=out, h_out=h_out, d_groups=7 if critic else None, **kw
        )
        assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
        ref, ref_h = guided_step_reference(z, eps, _coef_row(), **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h and critic is not None:
            assert h.data_ptr() == h_out.data_ptr() and torch.isfinite(h_out).all()
            torch.testing.assert_close(h_out, ref_h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_critic", [False, True], ids=["elementwise", "critic"])
@pytest.mark.parametrize("dim", [577, 576], ids=["d577", "d576"])
def test_guided_step_noise_is_the_reference_stream(with_critic, dim):
    """With a = b = c = 0 and s = 1 the step is the noise of (seed, step) itself."""
    z = torch.zeros(6, dim, device=DEV)
    critic = _stack(dim, 16) if with_critic else None
    out, _ = cuda_ops.guided_step(
        z, z, torch.tensor([0.0, 0, 0, 1], device=DEV), seq_len=3, seed=5, step=2, critic=critic
    )
    expected = noise.randn(5, 2, z.numel(), device=DEV).view_as(z)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


def test_guided_step_device_counters_equal_python_ints():
    batch, length, dim = 2, 4, 48
    z, eps, _ = _inputs(batch, length, dim, seed=5)
    base = {"seq_len": length, "critic": _stack(dim, 16), "noise_kappa": 0.2, "return_h": True}
    a, ha = cuda_ops.guided_step(z, eps, _coef_row(), seed=123, step=45, guidance=1.5, **base)
    b, hb = cuda_ops.guided_step(
        z,
        eps,
        _coef_row(),
        seed=torch.tensor(123, device=DEV),
        step=torch.tensor([45], dtype=torch.int32, device=DEV),
        guidance=torch.tensor(1.5, device=DEV),
        **base,
    )
    assert torch.equal(a, b) and torch.equal(ha, hb)
    c, _ = cuda_ops.guided_step(z, eps, _coef_row(), seed=123, step=46, guidance=1.5, **base)
    assert not torch.equal(a, c)


def test_guided_step_is_deterministic():
    z, eps, grad = _inputs(2, 100, 576, seed=6)
    kw = {"seq_len": 100, "seed": 9, "step": 3, "guidance": 1.0, "critic": _stack(576, 128)}
    first = cuda_ops.guided_step(
        z, eps, _coef_row(), grad=grad, noise_kappa=0.4, return_h=True, **kw
    )
    again = cuda_ops.guided_step(
        z, eps, _coef_row(), grad=grad, noise_kappa=0.4, return_h=True, **kw
    )
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_guided_step_errors_name_the_problem():
    z = torch.zeros(6, 8, device=DEV)
    with pytest.raises(ConfigError, match="multiple of seq_len"):
        cuda_ops.guided_step(z, z, _coef_row(), seq_len=4, seed=0, step=0)
    with pytest.raises(ConfigError, match="coef must be"):
        cuda_ops.guided_step(z, z, torch.zeros(5, 4, device=DEV), seq_len=3, seed=0, step=0)
    with pytest.raises(ConfigError, match="seed"):
        cuda_ops.guided_step(z, z, _coef_row(), seq_len=3, seed=-1, step=0)
    multi_row = _stack(8, 4)
    multi_row.b1 = torch.zeros(3, 4, device=DEV)
    with pytest.raises(ConfigError, match=r"stack\.row"):
        cuda_ops.guided_step(z, z, _coef_row(), seq_len=3, seed=0, step=0, critic=multi_row)
    with pytest.raises(ConfigError, match="CUDA tensors"):
        cuda_ops.guided_step(z.cpu(), z.cpu(), _coef_row().cpu(), seq_len=3, seed=0, step=0)


def test_guided_step_replays_in_a_cuda_graph():
    batch, length, dim = 2, 64, 576
    z, eps, grad = _inputs(batch, length, dim, seed=7)
    seed = torch.tensor(3, device=DEV)
    step = torch.tensor(1, device=DEV)
    lam = torch.tensor(1.5, device=DEV)
    stack = _stack(dim, 128)
    out = torch.empty(batch * length, dim, device=DEV)
    h_out = torch.empty(batch, device=DEV)
    coef = _coef_row()
    kw = {"seq_len": length, "critic": stack, "grad": grad, "noise_kappa": 0.3, "return_h": True}

    def run():  # creates no tensor from host data: capturable
        cuda_ops.guided_step(
            z, eps, coef, seed=seed, step=step, guidance=lam, out=out, h_out=h_out, **kw
        )

    run()  # warm up (loads the extension, sets the kernel attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for s in (5, 6):
        step.fill_(s)
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_h = guided_step_reference(z, eps, coef, seed=3, step=s, guidance=1.5, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(h_out, ref_h, rtol=RTOL, atol=ATOL)


def test_guided_step_traces_under_torch_compile():
    z, eps, _ = _inputs(2, 8, 64, seed=8)
    stack = _stack(64, 32)
    seed = torch.tensor(1, device=DEV)
    step = torch.tensor(2, device=DEV)
    lam = torch.tensor(0.5, device=DEV)
    coef = _coef_row()

    def fn(z, eps):
        out, h = cuda_ops.guided_step(
            z,
            eps,
            coef,
            seq_len=8,
            seed=seed,
            step=step,
            guidance=lam,
            critic=stack,
            return_h=True,
        )
        return out * 2, h

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, got_h = compiled(z, eps)
    want, want_h = fn(z, eps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=0)


# ---- round_to_vocab -------------------------------------------------------------------------


def _data(n_shape, v, d, dtype, *, seed=0, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*n_shape, d, generator=gen).to(dtype).to(DEV)
    weight = torch.randn(v, d, generator=gen).to(dtype).to(DEV)
    bias = torch.randn(v, generator=gen).to(DEV) if with_bias else None
    return z, weight, bias


def _check(z, weight, bias, **kw):
    """Run with poisoned outputs; compare with the reference up to near ties; return ids."""
    mismatches = pytest.importorskip("fastdia.kernels.round_to_vocab").rounding_mismatches
    lead, d = z.shape[:-1], weight.shape[1]
    out = torch.full(lead, SENTINEL, dtype=torch.int64, device=DEV)
    out_emb = torch.full((*lead, d), float("nan"), dtype=weight.dtype, device=DEV)
    ids, emb = cuda_ops.round_to_vocab(
        z, weight, bias, return_embeddings=True, out=out, out_embeddings=out_emb, **kw
    )
    assert ids.data_ptr() == out.data_ptr() and emb.data_ptr() == out_emb.data_ptr()
    assert ids.shape == lead and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < weight.shape[0])).all(), "an id was not written"
    ref = round_to_vocab_reference(z, weight, bias)
    differing, bad = mismatches(z, weight, bias, ids, ref)
    assert bad == 0, f"{bad} of {differing} differing rows are not near ties"
    assert differing <= max(1, ids.numel() // 100)
    assert emb.dtype == weight.dtype and torch.equal(emb, weight[ids])  # bit-exact gather
    plain = cuda_ops.round_to_vocab(z, weight, bias, **kw)  # functional op, direct path
    assert torch.equal(plain, ids)
    functional_ids, functional_emb = cuda_ops.round_to_vocab(
        z, weight, bias, return_embeddings=True, **kw
    )
    assert torch.equal(functional_ids, ids) and torch.equal(functional_emb, emb)
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("splits", [None, 1, 3], ids=["auto_split", "1_split", "3_splits"])
def test_round_to_vocab_matches_reference(dtype, with_bias, splits):
    z, weight, bias = _data((2, 37), 3001, 48, dtype, seed=1, with_bias=with_bias)
    _check(z, weight, bias, num_splits=splits)


@pytest.mark.parametrize(
    ("n_shape", "v", "d"),
    [
        ((1,), 1000, 577),
        ((5,), 17, 3),
        ((1, 1), 1, 16),
        ((130,), 1500, 1),
        ((300,), 50257, 768),
        ((4096,), 4099, 576),
    ],
    ids=["N1_d577", "V17_d3", "V1", "N130_d1", "gpt2", "N4096"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_to_vocab_awkward_shapes(n_shape, v, d, dtype):
    z, weight, bias = _data(n_shape, v, d, dtype, seed=2)
    for splits in (None, 2):
        _check(z, weight, bias, num_splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_to_vocab_full_smollm2_vocabulary(dtype):
    z, weight, bias = _data((3,), 49152, 576, dtype, seed=3)
    z[0] = weight[40000].float() * 3  # a clear winner far into the vocabulary
    ids = _check(z, weight, bias)
    assert ids[0] == 40000


@pytest.mark.parametrize("splits", [1, 5, None])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_to_vocab_ties_go_to_the_lowest_id(splits, dtype):
    """Duplicate rows inside one 128-entry tile, across tiles and across splits."""
    d, v = 16, 5000
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(v, d, generator=gen) * 0.1
    a, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    weight[[700, 720, 900, 1100, 4500]] = a  # same tile, next tiles / splits, last split
    weight[[2100, 4100]] = b  # only in later splits
    weight[[1500, 3000]] = -a
    z = torch.stack([a * 10, b * 10, -a * 10, torch.zeros(d)])
    weight, z = weight.to(dtype).to(DEV), z.to(dtype).to(DEV)
    ids = cuda_ops.round_to_vocab(z, weight, num_splits=splits)
    assert ids.tolist() == [700, 2100, 1500, 0]
    assert torch.equal(ids, round_to_vocab_reference(z, weight))


def test_round_to_vocab_mixed_operand_dtypes():
    z, weight, bias = _data((9,), 700, 40, torch.float32, seed=5)
    _check(z, weight.bfloat16(), bias)
    _check(z, weight.half(), bias)
    _check(z.half(), weight, bias)
    _check(z.bfloat16(), weight.half(), bias)


def test_round_to_vocab_rejects_what_it_cannot_do():
    with pytest.raises(ConfigError, match=r"z\.float\(\)"):
        cuda_ops.round_to_vocab(
            torch.zeros(2, 4, dtype=torch.float64, device=DEV), torch.zeros(3, 4, device=DEV)
        )
    with pytest.raises(ConfigError, match=r"need z \[\.\.\., d\]"):
        cuda_ops.round_to_vocab(torch.zeros(2, 4, device=DEV), torch.zeros(3, 5, device=DEV))
    with pytest.raises(ConfigError, match="empty"):
        cuda_ops.round_to_vocab(torch.zeros(2, 4, device=DEV), torch.zeros(0, 4, device=DEV))


def test_round_to_vocab_replays_in_a_cuda_graph():
    z, weight, bias = _data((64,), 49152, 576, torch.bfloat16, seed=6)
    ids = torch.empty(64, dtype=torch.int64, device=DEV)
    emb = torch.empty(64, 576, dtype=weight.dtype, device=DEV)

    def run():
        cuda_ops.round_to_vocab(
            z, weight, bias, return_embeddings=True, out=ids, out_embeddings=emb
        )

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    z.copy_(weight[torch.arange(64, device=DEV) * 700] * 4)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ids, round_to_vocab_reference(z, weight, bias))
    assert torch.equal(emb, weight[ids])


def test_round_to_vocab_traces_under_torch_compile():
    z, weight, bias = _data((4, 3), 300, 24, torch.float32, seed=7)

    def fn(z):
        ids, emb = cuda_ops.round_to_vocab(z, weight, bias, return_embeddings=True)
        return ids + 1, emb * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, got_emb = compiled(z)
    want, want_emb = fn(z)
    assert torch.equal(got, want) and torch.equal(got_emb, want_emb)


# ---- the registry and the sampler ------------------------------------------------------------


def test_cuda_backend_resolves_on_a_gpu_and_dispatches(monkeypatch):
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    for op in ops.SAMPLER_OPS:
        assert registry.resolve_backend("cuda", op, DEV) == "cuda"
    assert registry.get(ops.GUIDED_STEP, "cuda") is cuda_ops.guided_step
    z, weight, bias = _data((4, 3), 300, 24, torch.float32, seed=6)
    got, emb = ops.round_to_vocab(z, weight, bias, return_embeddings=True, backend="cuda")
    want = ops.round_to_vocab(z, weight, bias, backend="reference")
    assert torch.equal(got, want) and torch.equal(emb, weight[want])


@pytest.mark.parametrize("sampler", ["dia", "ddpm"])
def test_sampler_cuda_gives_the_reference_tokens(tiny_base, tiny_models, sampler):
    from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic

    denoiser, critic = tiny_models
    outs = {}
    try:
        for backend in ("reference", "cuda"):
            cfg = SamplerConfig(sampler=sampler, steps=4, guidance=2.0, backend=backend)
            s = Sampler(
                denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, device=DEV
            )
            assert s.backends == {op: backend for op in ops.SAMPLER_OPS}
            outs[backend] = s.sample(2, 10, prompt="The movie was", seed=3)
    finally:
        tiny_base.space.to("cpu")  # the session fixture's space was moved in place
    ref, got = outs["reference"], outs["cuda"]
    assert torch.equal(got.token_ids, ref.token_ids)
    assert got.texts == ref.texts
    torch.testing.assert_close(got.z, ref.z, rtol=1e-4, atol=1e-4)


def test_measured_auto_follows_a_real_profile(tmp_path, monkeypatch):
    from fastdia.ops import measured

    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    monkeypatch.setenv(measured.PROFILE_ENV, str(tmp_path / "profile.json"))
    out = tmp_path / "prof.json"
    assert main(["profile", "--quick", "--device", DEV, "--out", str(out), "--record"]) == 0
    results = json.loads(Path(measured.profile_path()).read_text())["devices"]
    results = results[measured.device_name(DEV)]
    for op in ops.SAMPLER_OPS:
        assert {"cuda", "reference"} <= set(results[op]["ms"])
        assert registry.resolve_backend("auto", op, DEV) == results[op]["fastest"]
