"""``guided_step``: every registered variant on every device it runs on against the PyTorch
reference (tests/variants.py): fresh random inputs, awkward shapes, every mode in fp32 and
bf16, fp16/bf16 inputs, poisoned outputs, column groups, device counters, determinism, the
noise stream, errors, a property test, the public entry point, CUDA graphs and the
compute-sanitizer's small cases; then the checks of one backend (named ``test_triton_...``,
``test_cuda_...``): Triton's tiles, grid and tf32 default, the cuda op under torch.compile.

The variant runs in its exact mode: Triton with ``precision="ieee"`` (the interpreter
computes every mode in fp32), the cuda kernels as they are (3xTF32, fp32-level).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from variants import CPU, CUDA, Variant, load, variant_params

from fastdia import noise, ops
from fastdia.errors import ConfigError
from fastdia.ops import TokenLocalStack, registry
from fastdia.ops.guided_step_ref import guided_step_reference

pytestmark = [  # numpy noise from the Triton interpreter
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

OP = ops.GUIDED_STEP
VARIANTS = variant_params(OP)
CHECKED = variant_params(OP, backends=("triton", "cuda"))  # check their inputs, take d_groups
ON_CUDA = variant_params(OP, devices=(CUDA,))
KNOBS = {"triton": ("d_groups", "precision"), "cuda": ("d_groups",)}
TARGETS = {  # what the registry must hand out for each backend
    "reference": "fastdia.ops.guided_step_ref:guided_step_reference",
    "triton": "fastdia.kernels.guided_step:guided_step",
    "cuda": "fastdia.ops.cuda_ops:guided_step",
}

# docs/design.md §3: fp32 relative error < 1e-5, compared in the variant's exact mode. The
# atol covers elements near zero (the noise's log/cos and the critic's 3xTF32 products round
# differently from the reference's).
RTOL, ATOL = 1e-5, 1e-5
EXACT = "ieee"
COEF_ROW = torch.tensor([1.05, -0.3, 0.2, 0.4])


def _variant(backend: str, device: str) -> Variant:
    defaults = {"precision": EXACT} if backend == "triton" else None
    return load(OP, backend, device, knobs=KNOBS.get(backend, ()), defaults=defaults)


def _stack(dim: int, hidden: int, seed: int = 0, device: str = CPU) -> TokenLocalStack:
    gen = torch.Generator().manual_seed(seed)
    return TokenLocalStack(
        w1=(torch.randn(hidden, dim, generator=gen) / dim**0.5).to(device),
        b1=torch.randn(hidden, generator=gen).to(device),
        w2=(torch.randn(hidden, generator=gen) / hidden**0.5).to(device),  # h_b = O(1)
        b2=torch.randn((), generator=gen).to(device),
    )


def _inputs(batch, length, dim, seed=0, dtype=torch.float32, device=CPU):
    """``(z, eps, grad)``, each ``[batch * length, dim]`` of ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * length
    return tuple(torch.randn(n, dim, generator=gen).to(dtype).to(device) for _ in range(3))


def _both(v: Variant, z, eps, coef, **kw):
    return v(z, eps, coef, **kw), guided_step_reference(z, eps, coef, **kw)


@pytest.mark.parametrize("return_h", [True, False], ids=["h", "no_h"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["row", "per_sample"])
@pytest.mark.parametrize("kappa", [0.0, 0.6], ids=["kappa0", "kappa"])
@pytest.mark.parametrize("with_critic", [True, False], ids=["critic", "no_critic"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_matches_reference(backend, device, per_sample, kappa, with_critic, with_grad, return_h):
    v = _variant(backend, device)
    batch, length, dim = 3, 5, 577
    z, eps, grad = _inputs(batch, length, dim, seed=1, device=device)
    coef = (torch.rand(batch, 4) + 0.1 if per_sample else COEF_ROW).to(device)
    kw = {
        "seq_len": length,
        "seed": 11,
        "step": 4,
        "guidance": 2.5,
        "critic": _stack(dim, 40, device=device) if with_critic else None,
        "grad": grad if with_grad else None,
        "noise_kappa": kappa,
        "return_h": return_h,
    }
    (out, h), (ref, ref_h) = _both(v, z, eps, coef, **kw)
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
        (8, 64, 768, 256),
    ],
    ids=[
        "N1_d577",
        "L33_H130",
        "d1",
        "L70_over_a_tile",
        "L130_d576",
        "H300",
        "L200_d768",
        "B8_d768",
    ],
)
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_awkward_shapes(backend, device, batch, length, dim, hidden):
    """Both grids: sequences (``kappa > 0`` or ``h``) and row tiles (the sampler's path,
    tiles straddling sequences)."""
    v = _variant(backend, device)
    z, eps, grad = _inputs(batch, length, dim, seed=2, device=device)
    coef = (torch.rand(batch, 4, generator=torch.Generator().manual_seed(batch)) + 0.1).to(device)
    for kappa, return_h in ((0.0, True), (0.3, True), (0.3, False), (0.0, False)):
        kw = {
            "seq_len": length,
            "seed": 3,
            "step": 9,
            "guidance": 1.5,
            "critic": _stack(dim, hidden, seed=1, device=device),
            "grad": grad,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        (out, h), (ref, ref_h) = _both(v, z, eps, coef, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h:
            torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)


# (per_sample, kappa, critic, grad, return_h): the row-tile mode (the sampler's) and the
# sequence mode (kappa > 0 or return_h), with and without critic and extra gradient
MODES = (
    (False, 0.0, True, True, False),
    (True, 0.0, True, False, False),
    (False, 0.0, False, True, False),
    (False, 0.0, True, True, True),
    (True, 0.6, True, True, True),
    (False, 0.6, True, False, False),
    (True, 0.0, False, False, True),
)


@pytest.mark.parametrize(
    ("batch", "length", "dim", "hidden"),
    [(3, 5, 577, 40), (1, 1, 577, 16), (4, 64, 576, 128)],
    ids=["L5_d577", "N1", "L64_d576"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_every_mode_into_poisoned_buffers(backend, device, dtype, batch, length, dim, hidden):
    """Every mode in fp32 and bf16 into NaN-filled output buffers."""
    v = _variant(backend, device)
    n = batch * length
    for i, (per_sample, kappa, with_critic, with_grad, return_h) in enumerate(MODES):
        z, eps, grad = _inputs(batch, length, dim, seed=i, dtype=dtype, device=device)
        coef = (torch.rand(batch, 4) if per_sample else COEF_ROW).to(device)
        kw = {
            "seq_len": length,
            "seed": 1234 + i,
            "step": 7,
            "guidance": 2.5,
            "critic": _stack(dim, hidden, i, device=device) if with_critic else None,
            "grad": grad if with_grad else None,
            "noise_kappa": kappa,
            "return_h": return_h,
        }
        out = torch.full((n, dim), float("nan"), device=device)
        h_out = torch.full((batch,), float("nan"), device=device)
        got, h = v(z, eps, coef, out=out, h_out=h_out, **kw)
        ref, ref_h = guided_step_reference(z, eps, coef, **kw)
        assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all(), MODES[i]
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if with_critic and return_h:
            assert h.data_ptr() == h_out.data_ptr()
            torch.testing.assert_close(h_out, ref_h, rtol=RTOL, atol=ATOL)
        else:
            assert h is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [64, 577], ids=["d64_vec", "d577_scalar"])
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_half_inputs_are_upcast_like_the_reference(backend, device, dtype, dim):
    v = _variant(backend, device)
    z, eps, grad = _inputs(2, 6, dim, seed=3, dtype=dtype, device=device)
    coef = COEF_ROW.to(device)
    for critic in (_stack(dim, 24, device=device), None):
        kw = {"seq_len": 6, "seed": 1, "step": 2, "guidance": 1.0, "critic": critic}
        (out, _), (ref, _) = _both(v, z, eps, coef, grad=grad, **kw)
        assert out.dtype == torch.float32
        # the operands are exact in fp32, so the result is fp32-accurate
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    mixed = {"seq_len": 6, "seed": 1, "step": 2, "guidance": 1.0}
    (out, _), (ref, _) = _both(
        v, z.float(), eps, coef, grad=grad, critic=_stack(dim, 24, device=device), **mixed
    )
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("length", [7, 70], ids=["L7", "L70"])
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_every_output_element_is_written(backend, device, length):
    v = _variant(backend, device)
    batch, dim = 3, 577
    z, eps, grad = _inputs(batch, length, dim, seed=4, device=device)
    coef = COEF_ROW.to(device)
    stack = _stack(dim, 20, device=device)
    for critic, kappa, return_h in (
        (stack, 0.0, False),
        (stack, 0.5, True),
        (stack, 0.0, True),
        (None, 0.0, False),
    ):
        out = torch.full((batch * length, dim), float("nan"), device=device)
        h_out = torch.full((batch,), float("nan"), device=device)
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
        groups = 7 if critic is not None else None
        got, h = v(z, eps, coef, out=out, h_out=h_out, d_groups=groups, **kw)
        assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
        ref, ref_h = guided_step_reference(z, eps, coef, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        if return_h and critic is not None:
            assert h.data_ptr() == h_out.data_ptr() and torch.isfinite(h_out).all()
            torch.testing.assert_close(h_out, ref_h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kappa", [0.0, 0.4], ids=["row_tiles", "sequences"])
@pytest.mark.parametrize(("backend", "device"), CHECKED)
def test_column_groups_give_the_same_result(backend, device, kappa):
    """The columns split over 1, 3, 5 or all groups (the critic's first pass recomputed in
    each): the same bits, and the reference's values, in both grids."""
    v = _variant(backend, device)
    batch, length, dim = 2, 70, 577
    z, eps, grad = _inputs(batch, length, dim, seed=9, device=device)
    coef = COEF_ROW.to(device)
    kw = {
        "seq_len": length,
        "seed": 4,
        "step": 8,
        "guidance": 1.5,
        "critic": _stack(dim, 130, device=device),
        "grad": grad,
        "noise_kappa": kappa,
        "return_h": True,
    }
    ref, ref_h = guided_step_reference(z, eps, coef, **kw)
    first = None
    for groups in (None, 1, 3, 5, 1000):
        out, h = v(z, eps, coef, d_groups=groups, **kw)
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)
        if first is None:
            first = (out, h)
        assert torch.equal(out, first[0]) and torch.equal(h, first[1])


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_device_tensor_counters_equal_python_ints(backend, device):
    """Seed, step and guidance as device tensors, in both grids."""
    v = _variant(backend, device)
    batch, length, dim = 2, 4, 48
    z, eps, _ = _inputs(batch, length, dim, seed=5, device=device)
    coef = COEF_ROW.to(device)
    stack = _stack(dim, 16, device=device)
    for mode in ({"noise_kappa": 0.2, "return_h": True}, {"noise_kappa": 0.0}):
        base = {"seq_len": length, "critic": stack, **mode}
        a, ha = v(z, eps, coef, seed=123, step=45, guidance=1.5, **base)
        b, hb = v(
            z,
            eps,
            coef,
            seed=torch.tensor(123, device=device),
            step=torch.tensor([45], dtype=torch.int32, device=device),
            guidance=torch.tensor(1.5, device=device),
            **base,
        )
        assert torch.equal(a, b)
        assert (ha is None and hb is None) or torch.equal(ha, hb)
        c, _ = v(z, eps, coef, seed=123, step=46, guidance=1.5, **base)
        assert not torch.equal(a, c)


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_is_deterministic(backend, device):
    v = _variant(backend, device)
    z, eps, grad = _inputs(2, 100, 576, seed=6, device=device)
    kw = {
        "seq_len": 100,
        "seed": 9,
        "step": 3,
        "guidance": 1.0,
        "critic": _stack(576, 128, device=device),
        "grad": grad,
        "noise_kappa": 0.4,
        "return_h": True,
    }
    first = v(z, eps, COEF_ROW.to(device), **kw)
    again = v(z, eps, COEF_ROW.to(device), **kw)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("with_critic", [False, True], ids=["elementwise", "critic"])
@pytest.mark.parametrize("dim", [577, 576], ids=["d577", "d576"])
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_noise_is_the_counter_based_stream(backend, device, with_critic, dim):
    """With a = b = c = 0 and s = 1 the step is the noise of (seed, step) itself, numbered
    per sequence: sequence b draws under seed 5 + b (or its own seed), its elements counted
    from 0."""
    v = _variant(backend, device)
    z = torch.zeros(6, dim, device=device)
    coef = torch.tensor([0.0, 0, 0, 1], device=device)
    critic = _stack(dim, 16, device=device) if with_critic else None
    out, _ = v(z, z, coef, seq_len=3, seed=5, step=2, critic=critic)
    expected = torch.cat(
        [noise.randn(5 + b, 2, 3 * dim, device=device).view(3, dim) for b in range(2)]
    )
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    seeds = torch.tensor([11, 4], dtype=torch.int64, device=device)
    out, _ = v(z, z, coef, seq_len=3, seed=seeds, step=2, critic=critic)
    expected = torch.cat([noise.randn(s, 2, 3 * dim, device=device).view(3, dim) for s in (11, 4)])
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("backend", "device"), CHECKED)
def test_errors_name_the_problem(backend, device):
    v = _variant(backend, device)
    z = torch.zeros(6, 8, device=device)
    coef = COEF_ROW.to(device)
    with pytest.raises(ConfigError, match="multiple of seq_len"):
        v(z, z, coef, seq_len=4, seed=0, step=0)
    with pytest.raises(ConfigError, match="coef must be"):
        v(z, z, torch.zeros(5, 4, device=device), seq_len=3, seed=0, step=0)
    with pytest.raises(ConfigError, match="seed"):
        v(z, z, coef, seq_len=3, seed=-1, step=0)
    multi_row = _stack(8, 4, device=device)
    multi_row.b1 = torch.zeros(3, 4, device=device)
    with pytest.raises(ConfigError, match=r"stack\.row"):
        v(z, z, coef, seq_len=3, seed=0, step=0, critic=multi_row)


@pytest.mark.cuda
def test_cuda_variant_rejects_cpu_tensors():
    v = _variant("cuda", CUDA)
    z = torch.zeros(6, 8)
    with pytest.raises(ConfigError, match="CUDA tensors"):
        v(z, z, COEF_ROW, seq_len=3, seed=0, step=0)


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
@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_property_matches_reference(
    backend, device, batch, length, dim, hidden, per_sample, kappa, seed
):
    v = _variant(backend, device)
    z, eps, grad = _inputs(batch, length, dim, seed=seed % 1000, device=device)
    coef = (torch.rand(batch, 4) if per_sample else COEF_ROW).to(device)
    kw = {
        "seq_len": length,
        "seed": seed,
        "step": 7,
        "guidance": 0.8,
        "critic": _stack(dim, hidden, seed=seed % 97, device=device),
        "grad": grad,
        "noise_kappa": kappa,
        "return_h": True,
    }
    (out, h), (ref, ref_h) = _both(v, z, eps, coef, **kw)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h, ref_h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_public_entry_point_dispatches(backend, device, monkeypatch):
    """The registry resolves the backend on the device and hands out its function; the
    public op with ``backend=`` runs it."""
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    v = _variant(backend, device)
    module, name = TARGETS[backend].split(":")
    assert registry.get(OP, backend) is getattr(importlib.import_module(module), name)
    z, eps, _ = _inputs(2, 3, 16, seed=6, device=device)
    kw = {"seq_len": 3, "seed": 1, "step": 1, "guidance": 1.0}
    kw["critic"] = _stack(16, 8, device=device)
    coef = COEF_ROW.to(device)
    got, _ = ops.guided_step(z, eps, coef, backend=backend, **v.defaults, **kw)
    ref, _ = ops.guided_step(z, eps, coef, backend="reference", **kw)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("backend", "device"), ON_CUDA)
def test_replays_in_a_cuda_graph(backend, device):
    """Captured once with seed, step and guidance on the device; each replay reads the new
    step there and gives the reference's step (and, for a fused kernel, the eager bits)."""
    v = _variant(backend, device)
    batch, length, dim = 2, 64, 576
    z, eps, grad = _inputs(batch, length, dim, seed=7, device=device)
    seed = torch.tensor(3, device=device)
    step = torch.tensor(1, device=device)
    lam = torch.tensor(1.5, device=device)
    stack = _stack(dim, 128, device=device)
    out = torch.empty(batch * length, dim, device=device)
    h_out = torch.empty(batch, device=device)
    coef = COEF_ROW.to(device)
    kw = {"seq_len": length, "critic": stack, "grad": grad, "noise_kappa": 0.3, "return_h": True}

    def run():  # creates no tensor from host data: capturable
        v(z, eps, coef, seed=seed, step=step, guidance=lam, out=out, h_out=h_out, **kw)

    run()  # warm up (loads the extension, autotunes, sets the kernel attributes)
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
        if backend != "reference":  # one deterministic kernel: replay and eager agree bitwise
            eager, eager_h = v(z, eps, coef, seed=3, step=s, guidance=1.5, **kw)
            assert torch.equal(out, eager) and torch.equal(h_out, eager_h)


@pytest.mark.parametrize(("backend", "device"), VARIANTS)
def test_every_path_on_small_shapes(backend, device):
    """Every kernel path once on small, awkward shapes: N = 1, d = 577 and d = 1 (unaligned
    loads), d = 64 (vector loads), H = 130, fp32/fp16/bf16, elementwise, row-tile and
    per-sequence steps, with and without column groups. scripts/cuda_sanitize.py runs this
    test of the cuda backend under compute-sanitizer (memcheck, racecheck, synccheck)."""
    v = _variant(backend, device)
    gen = torch.Generator().manual_seed(0)
    for batch, length, dim, hidden in ((1, 1, 577, 16), (2, 3, 64, 130), (3, 70, 1, 5)):
        n = batch * length
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            z, eps, grad = (
                torch.randn(n, dim, generator=gen).to(dtype).to(device) for _ in range(3)
            )
            stack = TokenLocalStack(
                (torch.randn(hidden, dim, generator=gen) / dim**0.5).to(device),
                torch.randn(hidden, generator=gen).to(device),
                (torch.randn(hidden, generator=gen) / hidden**0.5).to(device),
                torch.randn((), generator=gen).to(device),
            )
            coef = (torch.rand(batch, 4, generator=gen) + 0.1).to(device)
            for critic, kappa, return_h, g, groups in (
                (None, 0.0, False, None, None),
                (None, 0.0, False, grad, None),
                (stack, 0.0, False, grad, None),
                (stack, 0.0, False, grad, 3),
                (stack, 0.5, True, grad, None),
                (stack, 0.5, True, grad, 2),
                (stack, 0.0, True, None, None),
            ):
                kw = {
                    "seq_len": length,
                    "seed": 7,
                    "step": 3,
                    "guidance": 1.5,
                    "critic": critic,
                    "grad": g,
                    "noise_kappa": kappa,
                    "return_h": return_h,
                }
                out, h = v(z, eps, coef, d_groups=groups, **kw)
                ref, ref_h = guided_step_reference(z, eps, coef, **kw)
                case = ((batch, length, dim), dtype, kappa, return_h, groups, g is not None)

                def msg(text: str, case=case) -> str:
                    return f"{text}\ncase (shape, dtype, kappa, return_h, groups, grad): {case}"

                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=msg)
                if h is not None:
                    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4, msg=msg)


# ---- the triton backend: tiles, grid and precision -------------------------------------------


@pytest.fixture
def kernel():
    """The Triton kernel module, its kernels run by the interpreter on the CPU."""
    _variant("triton", CPU)
    return importlib.import_module("fastdia.kernels.guided_step")


@pytest.mark.parametrize("dim", [48, 70])
def test_triton_gpu_like_tiles(kernel, monkeypatch, dim):
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
        out, h = kernel.guided_step(z, eps, coef, precision=EXACT, **kw)
        ref, ref_h = guided_step_reference(z, eps, coef, **kw)
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
def test_triton_d_groups_cover_every_column(kernel, monkeypatch, d_groups, expected):
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
def test_triton_grid_fills_an_h100_at_the_samplers_sizes(tokens):
    """With 132 SMs, every autotuned config fills at least half of them in one wave for a
    few hundred tokens (or splits d as far as it goes), and stops splitting once the row
    tiles alone fill more than half."""
    pytest.importorskip("triton")
    kernel = importlib.import_module("fastdia.kernels.guided_step")
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


def test_triton_default_precision_is_tf32(kernel, monkeypatch):
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


@pytest.mark.parametrize(("backend", "device"), variant_params(OP, backends=("triton",)))
def test_triton_tf32_default_is_within_the_tf32_error_bound(backend, device):
    """The default (tf32) against the fp32 reference, to the bound of tf32's operand
    rounding. Meaningful on a GPU; the interpreter computes fp32, so on the CPU this only
    checks that the default path is a correct step."""
    v = _variant(backend, device)
    batch, length, dim, hidden = 4, 32, 576, 128
    z, eps, _ = _inputs(batch, length, dim, seed=11, device=device)
    stack = _stack(dim, hidden, seed=4, device=device)
    coef, lam = COEF_ROW.to(device), 3.0
    kw = {"seq_len": length, "seed": 7, "step": 2, "guidance": lam, "critic": stack}
    got, _ = v.fn(z, eps, coef, **kw)  # the kernel's own default precision
    ref, _ = guided_step_reference(z, eps, coef, **kw)
    bound = _tf32_error_bound(z, COEF_ROW, lam, stack, length)
    err = (got - ref).double().abs().cpu()
    assert (err <= 2 * bound + ATOL + RTOL * ref.double().abs().cpu()).all()
    assert err.max() < 0.05 * ref.abs().max().item()


# ---- the cuda backend under torch.compile -----------------------------------------------------


@pytest.mark.cuda
def test_cuda_op_traces_under_torch_compile():
    v = _variant("cuda", CUDA)
    z, eps, _ = _inputs(2, 8, 64, seed=8, device=CUDA)
    stack = _stack(64, 32, device=CUDA)
    seed = torch.tensor(1, device=CUDA)
    step = torch.tensor(2, device=CUDA)
    lam = torch.tensor(0.5, device=CUDA)
    coef = COEF_ROW.to(CUDA)

    def fn(z, eps):
        out, h = v.fn(
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
