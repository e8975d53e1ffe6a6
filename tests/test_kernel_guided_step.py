"""The Triton ``guided_step`` kernel (under ``TRITON_INTERPRET=1`` on the CPU) against the
PyTorch reference, the registry's choice of it, and the whole sampler and CLI on it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fastdia import noise, ops
from fastdia.errors import ConfigError
from fastdia.ops import TokenLocalStack, registry
from fastdia.ops.guided_step_ref import guided_step_reference

kernel = pytest.importorskip("fastdia.kernels.guided_step")

pytestmark = [  # numpy noise from the Triton interpreter
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

# docs/design.md §3: fp32 relative error < 1e-5, compared in the kernel's exact mode (``ieee``; the
# interpreter computes every mode in fp32). The atol covers elements near zero (the noise's
# log/cos rounding differs by about 1e-7 between numpy and torch).
RTOL, ATOL = 1e-5, 1e-5
EXACT = "ieee"


def _stack(dim: int, hidden: int, seed: int = 0) -> TokenLocalStack:
    gen = torch.Generator().manual_seed(seed)
    return TokenLocalStack(
        w1=torch.randn(hidden, dim, generator=gen) / dim**0.5,
        b1=torch.randn(hidden, generator=gen),
        w2=torch.randn(hidden, generator=gen) / hidden**0.5,  # h_b = O(1), like a real critic
        b2=torch.randn((), generator=gen),
    )


def _inputs(batch: int, length: int, dim: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n = batch * length
    z, eps, grad = (torch.randn(n, dim, generator=gen).to(dtype) for _ in range(3))
    return z, eps, grad


def _both(z, eps, coef, **kw):
    got = kernel.guided_step(z, eps, coef, precision=EXACT, **kw)
    want = guided_step_reference(z, eps, coef, **kw)
    return got, want


COEF_ROW = torch.tensor([1.05, -0.3, 0.2, 0.4])


@pytest.mark.parametrize("per_sample", [False, True], ids=["row", "per_sample"])
@pytest.mark.parametrize("kappa", [0.0, 0.6], ids=["kappa0", "kappa"])
@pytest.mark.parametrize("with_critic", [True, False], ids=["critic", "no_critic"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
def test_matches_reference(per_sample, kappa, with_critic, with_grad):
    batch, length, dim = 3, 5, 577
    z, eps, grad = _inputs(batch, length, dim, seed=1)
    coef = torch.rand(batch, 4) + 0.1 if per_sample else COEF_ROW
    kw = {
        "seq_len": length,
        "seed": 11,
        "step": 4,
        "guidance": 2.5,
        "critic": _stack(dim, 40) if with_critic else None,
        "grad": grad if with_grad else None,
        "noise_kappa": kappa,
        "return_h": True,
    }
    (out, h), (ref, ref_h) = _both(z, eps, coef, **kw)
    assert out.shape == (batch * length, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    if with_critic:
        torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)
    else:
        assert h is None


@pytest.mark.parametrize(
    ("batch", "length", "dim", "hidden"),
    [(1, 1, 577, 16), (2, 33, 48, 130), (1, 3, 1, 5), (4, 70, 24, 8)],
    ids=["N1_d577", "L33_H130", "d1", "L70_over_a_tile"],
)
def test_awkward_shapes(batch, length, dim, hidden):
    z, eps, grad = _inputs(batch, length, dim, seed=2)
    coef = torch.rand(batch, 4, generator=torch.Generator().manual_seed(batch)) + 0.1
    for kappa in (0.0, 0.3):
        kw = {
            "seq_len": length,
            "seed": 3,
            "step": 9,
            "guidance": 1.5,
            "critic": _stack(dim, hidden, seed=1),
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": True,
        }
        (out, h), (ref, ref_h) = _both(z, eps, coef, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)
        # the sampler's path: row tiles (no kappa, no h), here straddling sequences
        (out, _), (ref, _) = _both(z, eps, coef, **{**kw, "noise_kappa": 0.0, "return_h": False})
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dim", [48, 70])
def test_gpu_like_tiles(monkeypatch, dim):
    """The GPU's small tiles (several d chunks, several row tiles and sequence tiles) instead
    of the interpreter's one-chunk tiles."""
    monkeypatch.setattr(kernel, "_interpreter_meta", lambda rows, d: {"BLOCK_N": 16, "BLOCK_D": 32})
    batch, length = 3, 21
    z, eps, grad = _inputs(batch, length, dim, seed=8)
    coef = torch.rand(batch, 4, generator=torch.Generator().manual_seed(8))
    for kappa, return_h in ((0.0, False), (0.4, True), (0.0, True)):
        kw = {
            "seq_len": length,
            "seed": 21,
            "step": 2,
            "guidance": 1.5,
            "critic": _stack(dim, 20, seed=2),
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        (out, h), (ref, ref_h) = _both(z, eps, coef, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h:
            torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)


class _LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid and keywords."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def call(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return launch(*args, **kwargs)

        return call


@pytest.mark.parametrize(("d_groups", "expected"), [(2, 2), (3, 3), (7, 5)])
def test_d_groups_cover_every_column(monkeypatch, d_groups, expected):
    """The 2-D grid (row tiles x d groups): every column written once, in both modes, the
    critic's pass A recomputed per group; more groups than chunks are clamped."""
    monkeypatch.setattr(kernel, "_interpreter_meta", lambda rows, d: {"BLOCK_N": 16, "BLOCK_D": 16})
    spy = _LaunchSpy(kernel._guided_step_kernel)
    monkeypatch.setattr(kernel, "_guided_step_kernel", spy)
    batch, length, dim = 2, 19, 70  # 5 chunks of 16 columns, the last one masked
    z, eps, grad = _inputs(batch, length, dim, seed=9)
    coef = torch.rand(batch, 4, generator=torch.Generator().manual_seed(9)) + 0.1
    for kappa, return_h in ((0.0, False), (0.4, True), (0.0, True)):
        kw = {
            "seq_len": length,
            "seed": 5,
            "step": 3,
            "guidance": 1.5,
            "critic": _stack(dim, 24, seed=3),
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        out = torch.full((batch * length, dim), float("nan"))
        h_out = torch.full((batch,), float("nan"))
        got, h = kernel.guided_step(
            z, eps, coef, out=out, h_out=h_out, precision=EXACT, d_groups=d_groups, **kw
        )
        assert got.data_ptr() == out.data_ptr()
        assert (h is None) != return_h
        rows = batch if return_h else -(-batch * length // 16)
        assert spy.launches[-1][0] == (rows, expected)
        ref, ref_h = guided_step_reference(z, eps, coef, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h:
            torch.testing.assert_close(h_out, ref_h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("tokens", [64, 128, 256, 384, 512, 1024])
def test_grid_fills_an_h100_at_the_samplers_sizes(tokens):
    """With 132 SMs, every autotuned config fills at least half of them in one wave for a
    few hundred tokens (or splits d as far as it goes), and stops splitting once the row
    tiles alone fill more than half."""
    sms, dim = 132, 576
    for config in kernel._CONFIGS:
        block_n, block_d = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
        rows = -(-tokens // block_n)
        groups = kernel.d_groups_for(rows, dim, block_d, sms)
        chunks = -(-dim // block_d)
        assert rows * groups > sms // 2 or groups == chunks, (config, rows, groups)
        assert rows * groups <= sms or groups == 1, (config, rows, groups)
        per_group = -(-chunks // groups)
        assert -(-chunks // per_group) == groups  # the kernel's recount agrees
        assert (groups - 1) * per_group < chunks  # no empty group
    assert kernel.d_groups_for(8192 // 64, dim, 32, sms) == 1


def test_default_precision_is_tf32(monkeypatch):
    spy = _LaunchSpy(kernel._guided_step_kernel)
    monkeypatch.setattr(kernel, "_guided_step_kernel", spy)
    z, eps, _ = _inputs(1, 4, 16, seed=10)
    kernel.guided_step(z, eps, COEF_ROW, seq_len=4, seed=0, step=0, critic=_stack(16, 8))
    kernel.guided_step(z, eps, COEF_ROW, seq_len=4, seed=0, step=0, precision="tf32x3")
    assert [kw["PRECISION"] for _, kw in spy.launches] == ["tf32", "tf32x3"]
    with pytest.raises(ConfigError, match="precision must be one of tf32, tf32x3, ieee"):
        kernel.guided_step(z, eps, COEF_ROW, seq_len=4, seed=0, step=0, precision="fp64")


def _tf32_error_bound(z, coef, guidance, stack, seq_len):
    """First-order bound on ``|z'_tf32 - z'_fp32|`` of one step: tf32 keeps 10 of fp32's 23
    mantissa bits (truncated: relative error <= 2**-10 per operand) in both critic matmuls,
    ``pre = z W1^T`` and ``g = (silu'(pre) w2) W1 / L``; ``|silu''| <= 0.5``."""
    u = 2.0**-10
    z, w1, b1, w2 = (x.double().cpu() for x in (z, stack.w1, stack.b1, stack.w2))
    pre = z @ w1.T + b1
    sig = torch.sigmoid(pre)
    gp = (sig * (1 + pre * (1 - sig))) * w2
    d_pre = 2 * u * (z.abs() @ w1.abs().T)
    d_gp = 0.5 * w2.abs() * d_pre
    d_g = (2 * u * (gp.abs() @ w1.abs()) + d_gp @ w1.abs()) / seq_len
    return abs(float(coef[2]) * guidance) * d_g


_DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else []
)


@pytest.mark.parametrize("device", _DEVICES)
def test_tf32_default_is_within_the_tf32_error_bound(device):
    """The default (tf32) against the fp32 reference, to the bound of tf32's operand
    rounding. Meaningful on a GPU (run with TRITON_INTERPRET=0); the interpreter computes
    fp32, so on the CPU this only checks that the default path is a correct step."""
    batch, length, dim, hidden = 4, 32, 576, 128
    z, eps, _ = (x.to(device) for x in _inputs(batch, length, dim, seed=11))
    stack = _stack(dim, hidden, seed=4)
    stack = TokenLocalStack(*(x.to(device) for x in (stack.w1, stack.b1, stack.w2, stack.b2)))
    coef, lam = COEF_ROW.to(device), 3.0
    kw = {"seq_len": length, "seed": 7, "step": 2, "guidance": lam, "critic": stack}
    got, _ = kernel.guided_step(z, eps, coef, **kw)
    ref, _ = guided_step_reference(z, eps, coef, **kw)
    bound = _tf32_error_bound(z, COEF_ROW, lam, stack, length)
    err = (got - ref).double().abs().cpu()
    assert (err <= 2 * bound + ATOL + RTOL * ref.double().abs().cpu()).all()
    assert err.max() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast_like_the_reference(dtype):
    z, eps, grad = _inputs(2, 6, 64, seed=3, dtype=dtype)
    kw = {"seq_len": 6, "seed": 1, "step": 2, "guidance": 1.0, "critic": _stack(64, 24)}
    (out, _), (ref, _) = _both(z, eps, COEF_ROW, grad=grad, **kw)
    assert out.dtype == torch.float32
    # the operands are exactly representable in fp32, so the result is fp32-accurate
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_every_output_element_is_written():
    batch, length, dim = 3, 7, 577
    z, eps, grad = _inputs(batch, length, dim, seed=4)
    for kappa, return_h in ((0.0, False), (0.5, True)):
        out = torch.full((batch * length, dim), float("nan"))
        h_out = torch.full((batch,), float("nan"))
        kw = {
            "seq_len": length,
            "seed": 0,
            "step": 1,
            "guidance": 2.0,
            "critic": _stack(dim, 20),
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        got, h = kernel.guided_step(z, eps, COEF_ROW, out=out, h_out=h_out, precision=EXACT, **kw)
        assert got.data_ptr() == out.data_ptr()
        assert torch.isfinite(out).all()
        ref, ref_h = guided_step_reference(z, eps, COEF_ROW, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h:
            assert h.data_ptr() == h_out.data_ptr() and torch.isfinite(h_out).all()
            torch.testing.assert_close(h_out, ref_h, rtol=RTOL, atol=ATOL)


def test_device_tensor_counters_equal_python_ints():
    batch, length, dim = 2, 4, 48
    z, eps, _ = _inputs(batch, length, dim, seed=5)
    stack = _stack(dim, 16)
    base = {"seq_len": length, "critic": stack, "noise_kappa": 0.2, "return_h": True}
    a, ha = kernel.guided_step(z, eps, COEF_ROW, seed=123, step=45, guidance=1.5, **base)
    b, hb = kernel.guided_step(
        z,
        eps,
        COEF_ROW,
        seed=torch.tensor(123),
        step=torch.tensor([45], dtype=torch.int32),
        guidance=torch.tensor(1.5),
        **base,
    )
    assert torch.equal(a, b) and torch.equal(ha, hb)
    c, _ = kernel.guided_step(z, eps, COEF_ROW, seed=123, step=46, guidance=1.5, **base)
    assert not torch.equal(a, c)


def test_noise_is_the_counter_based_stream():
    """With a = b = c = 0 and s = 1 the step is the noise of (seed, step) itself, numbered
    per sequence: sequence b draws under seed 5 + b, its elements counted from 0."""
    z = torch.zeros(6, 577)
    out, _ = kernel.guided_step(z, z, torch.tensor([0.0, 0, 0, 1]), seq_len=3, seed=5, step=2)
    expected = torch.cat([noise.randn(5 + b, 2, 3 * 577).view(3, 577) for b in range(2)])
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    seeds = torch.tensor([11, 4], dtype=torch.int64)
    out, _ = kernel.guided_step(z, z, torch.tensor([0.0, 0, 0, 1]), seq_len=3, seed=seeds, step=2)
    expected = torch.cat([noise.randn(s, 2, 3 * 577).view(3, 577) for s in (11, 4)])
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


def test_errors_name_the_problem():
    z = torch.zeros(6, 8)
    with pytest.raises(ConfigError, match="multiple of seq_len"):
        kernel.guided_step(z, z, COEF_ROW, seq_len=4, seed=0, step=0)
    with pytest.raises(ConfigError, match="coef must be"):
        kernel.guided_step(z, z, torch.zeros(5, 4), seq_len=3, seed=0, step=0)
    with pytest.raises(ConfigError, match="seed"):
        kernel.guided_step(z, z, COEF_ROW, seq_len=3, seed=-1, step=0)
    multi_row = _stack(8, 4)
    multi_row.b1 = torch.zeros(3, 4)
    with pytest.raises(ConfigError, match=r"stack\.row"):
        kernel.guided_step(z, z, COEF_ROW, seq_len=3, seed=0, step=0, critic=multi_row)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    dim=st.integers(1, 70),
    hidden=st.integers(1, 33),
    per_sample=st.booleans(),
    kappa=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(batch, length, dim, hidden, per_sample, kappa, seed):
    z, eps, grad = _inputs(batch, length, dim, seed=seed % 1000)
    coef = torch.rand(batch, 4) if per_sample else COEF_ROW
    kw = {
        "seq_len": length,
        "seed": seed,
        "step": 7,
        "guidance": 0.8,
        "critic": _stack(dim, hidden, seed=seed % 97),
        "grad": grad,
        "noise_kappa": kappa,
        "return_h": True,
    }
    (out, h), (ref, ref_h) = _both(z, eps, coef, **kw)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)


# ---- registry ------------------------------------------------------------------------------


def test_triton_variant_is_registered_and_explicit_only_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    for op in ops.SAMPLER_OPS:
        assert "triton" in registry.backends(op)
        assert registry.resolve_backend("triton", op, "cpu") == "triton"
        assert registry.resolve_backend("auto", op, "cpu") == "reference"
    assert registry.get(ops.GUIDED_STEP, "triton") is kernel.guided_step


def test_public_entry_point_dispatches_to_triton():
    z, eps, _ = _inputs(2, 3, 16, seed=6)
    kw = {"seq_len": 3, "seed": 1, "step": 1, "guidance": 1.0, "critic": _stack(16, 8)}
    got, _ = ops.guided_step(z, eps, COEF_ROW, backend="triton", precision=EXACT, **kw)
    ref, _ = ops.guided_step(z, eps, COEF_ROW, backend="reference", **kw)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


# ---- the whole sampler and the CLI ---------------------------------------------------------


@pytest.mark.parametrize("sampler", ["dia", "ddpm"])
def test_sampler_triton_gives_the_reference_tokens(tiny_base, tiny_models, sampler):
    from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic

    denoiser, critic = tiny_models
    outs = {}
    for backend in ("reference", "triton"):
        cfg = SamplerConfig(sampler=sampler, steps=4, guidance=2.0, backend=backend)
        s = Sampler(denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg)
        assert s.backends == {op: backend for op in ops.SAMPLER_OPS}
        outs[backend] = s.sample(2, 10, prompt="The movie was", seed=3)
    ref, tri = outs["reference"], outs["triton"]
    assert torch.equal(tri.token_ids, ref.token_ids)
    assert tri.texts == ref.texts
    torch.testing.assert_close(tri.z, ref.z, rtol=1e-4, atol=1e-4)


def test_sampler_triton_with_adaptive_noise_and_clamping(tiny_base, tiny_models):
    from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic

    denoiser, critic = tiny_models
    outs = {}
    for backend in ("reference", "triton"):
        cfg = SamplerConfig(
            steps=3, guidance=1.0, noise_kappa=0.5, clamp_from=2, corrector_steps=1, backend=backend
        )
        s = Sampler(denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg)
        outs[backend] = s.sample(2, 8, seed=1)
    assert torch.equal(outs["triton"].token_ids, outs["reference"].token_ids)


def test_cli_sample_with_triton_backend(tiny_model_dir, capsys):
    from fastdia.cli import main

    code = main(
        [
            "sample",
            "--base-model",
            str(tiny_model_dir),
            "--random-init",
            "--backend",
            "triton",
            "--length",
            "8",
            "--steps",
            "2",
            "--num-samples",
            "1",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    summary = lines[-1]["summary"]
    assert summary["backend"] == "triton" and summary["steps"] == 2
    assert len(lines) == 2 and len(lines[0]["completion_ids"]) <= 8
