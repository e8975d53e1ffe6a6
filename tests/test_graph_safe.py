"""The planned loop is graph-safe (docs/design.md §2), checked on the CPU and the meta device.

After ``plan()``, every block of the loop (:meth:`WindowDiffusion.denoise` and the LM
decode's :meth:`DecodePlan.step`) must create no tensor from host values, read nothing
back to the host and touch no tensor off the plan's device:
:class:`fastdia.strict.GraphSafeMode` fails on any of these. The same loop on the
``meta`` device catches a tensor made without ``device=`` (it would land on the CPU).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdia import noise
from fastdia.decode import DECODE_STEP, DecodeConfig
from fastdia.models.common import TIME_SCALE
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.models.proposal import AmortisedProposal, ProposalConfig
from fastdia.ops.guided_step_ref import TokenLocalStack, guided_step_reference
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.strict import GraphSafeMode, GraphSafetyError

PROMPT = "The movie was"


def _denoiser(space, **kw) -> Denoiser:
    torch.manual_seed(0)
    cfg = DenoiserConfig(dim=space.dim, max_length=16, hidden=16, layers=1, heads=2, **kw)
    return Denoiser(cfg).eval()


def _critic(space, kind: str = "token_local"):
    torch.manual_seed(1)
    extra = {"heads": 2, "layers": 1} if kind == "context" else {}
    return build_critic(
        CriticConfig(dim=space.dim, kind=kind, hidden=8, reward="sentiment", **extra)
    ).eval()


# (denoiser options, sampler options, with a context critic)
CASES = {
    "eps-noised-prompt": ({}, {"sampler": "dia", "guidance": 2.0}, False),
    "clean-selfcond": ({"clean_prompt": True, "self_condition": True}, {"guidance": 1.0}, False),
    "x0-clamp-corrector-kappa-stop": (
        {"prediction": "x0", "self_condition": True},
        {
            "sampler": "ddpm",
            "guidance": 1.5,
            "clamp_from": 2,
            "corrector_steps": 1,
            "noise_kappa": 0.3,
            "stop_at": 0.2,
            "rounding": "inner",
        },
        False,
    ),
    "adaln-ddim-context-critic": ({"arch": "adaln"}, {"sampler": "ddim", "guidance": 1.0}, True),
    "mala-clean-selfcond-context-critic": (
        {"clean_prompt": True, "self_condition": True},
        {"guidance": 1.0, "mh_steps": 2, "mh_snr": 0.3, "corrector_steps": 1},
        True,
    ),
    "mala-x0-noised-prompt-stop": (
        {"prediction": "x0"},
        {"guidance": 2.0, "mh_steps": 1, "stop_at": 0.2},
        False,
    ),
    "proposal-clean-selfcond-corrector": (
        {"clean_prompt": True, "self_condition": True},
        {"guidance": 1.0, "guidance_estimator": "proposal", "corrector_steps": 1},
        False,
    ),
}


def _sampler(space, case: str, device: str = "cpu") -> Sampler:
    den_kw, cfg_kw, context = CASES[case]
    critics = [WeightedCritic("sentiment", _critic(space), 1.0)]
    if context:
        critics.append(WeightedCritic("nontoxic", _critic(space, "context"), 0.5))
    config = SamplerConfig(steps=3, backend="reference", **cfg_kw)
    proposal = weights = None
    if config.guidance_estimator == "proposal":
        torch.manual_seed(2)
        proposal = AmortisedProposal(ProposalConfig(dim=space.dim, rewards=["sentiment"], hidden=8))
        weights = proposal.reward_weights([("sentiment", 1.0)])
    return Sampler(
        _denoiser(space, **den_kw),
        space,
        critics,
        config,
        device=device,
        proposal=proposal,
        proposal_weights=weights,
    )


def test_mode_fails_on_factory_ops_host_reads_and_other_devices():
    x = torch.ones(3)
    with GraphSafeMode("cpu"):
        y = torch.zeros_like(x) + x * 2.0  # derived from a tensor, arithmetic: allowed
        for bad in (
            lambda: torch.zeros(3),
            lambda: torch.full((), 7),
            lambda: torch.arange(3),
            lambda: torch.tensor(1.5),
            lambda: x.new_zeros(2),
            lambda: torch.randn(2),
            lambda: y.sum().item(),
            lambda: float(y[0]),
            lambda: bool(y[0] > 0),
            lambda: y.nonzero(),
            lambda: y.to("meta"),
        ):
            with pytest.raises(GraphSafetyError):
                bad()
    meta = torch.ones(3, device="meta")
    with GraphSafeMode("meta"):
        torch.zeros_like(meta).add_(meta)
        with pytest.raises(GraphSafetyError, match="is on cpu"):
            meta + x
    with GraphSafeMode("cpu", raise_errors=False) as mode:
        torch.zeros(2)
        torch.ones(2).sum().item()
    assert len(mode.violations) == 3 and "aten.zeros" in mode.violations[0]

    def timestep_embedding():  # an allowed function: factory ops inside it pass
        return torch.arange(3)

    with GraphSafeMode("cpu", allow_factories_in=("timestep_embedding",)):
        timestep_embedding()
        with pytest.raises(GraphSafetyError):
            torch.arange(3)


def test_noise_from_device_seed_matches_the_integer_seed():
    """Seed and step read from tensors give the very same numbers (the Philox words are
    the same), with no factory op and no host read."""
    index = torch.arange(0, 4000, 7).view(4, -1)
    seed, step, shape = torch.tensor(123), torch.tensor(45), torch.empty(3, 5, 11)
    seeds, vocab = torch.tensor([123, 9, 40]), torch.arange(20)
    with GraphSafeMode("cpu"):
        got = noise.randn_at(seed, step, index)
        like = noise.randn_like(seed, step, shape)
        rows = noise.randn_rows(seeds, step, shape)
        gumbel = noise.gumbel_rows(seeds, step, vocab)
    for b, s in enumerate((123, 9, 40)):
        assert torch.equal(rows[b], noise.randn(s, 45, 55).view(5, 11))
        assert torch.equal(gumbel[b], noise.gumbel(s, 45, 20))
    assert torch.equal(got, noise.randn_at(123, 45, index))
    assert torch.equal(got.view(-1), noise.randn(123, 45, 4000)[index.view(-1)])
    assert torch.equal(like, noise.randn(123, 45, 165).view(3, 5, 11))
    assert int(seed) == 123 and int(step) == 45  # the caller's tensors are not modified


def test_reference_step_is_graph_safe_with_device_counters():
    torch.manual_seed(0)
    z, eps = torch.randn(6, 5), torch.randn(6, 5)
    stack = TokenLocalStack(torch.randn(4, 5), torch.randn(4), torch.randn(4), torch.randn(()))
    kw = {"seq_len": 3, "critic": stack, "noise_kappa": 0.2, "return_h": True}
    coef = torch.tensor([[1.0, -0.2, 0.3, 0.5], [0.9, 0.1, 0.2, 0.4]])
    want, want_h = guided_step_reference(z, eps, coef, seed=5, step=2, guidance=1.5, **kw)
    # one seed 5 for the batch means the per-row seeds [5, 6]
    seed, step, lam = torch.tensor([5, 6]), torch.tensor(2), torch.tensor(1.5)
    out, h_out = torch.full_like(z, float("nan")), torch.full((2,), float("nan"))
    with GraphSafeMode("cpu"):
        got, h = guided_step_reference(
            z, eps, coef, seed=seed, step=step, guidance=lam, out=out, h_out=h_out, **kw
        )
    assert got is out and h is h_out
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)


def _mode(device: str, case: str, **extra) -> GraphSafeMode:
    """The strict mode for a case. A context critic computes its time features in the loop
    (fastdia.models.common.timestep_embedding: a constant frequency table from ``arange``,
    the same on every replay); factory ops are allowed there and nowhere else."""
    allowed = ("timestep_embedding",) if CASES[case][2] else ()
    allowed += tuple(extra.pop("allow_factories_in", ()))
    return GraphSafeMode(device, allow_factories_in=allowed, **extra)


ROWS = ["The movie was", None]  # a ragged batch: a prompt and none


@pytest.mark.parametrize("case", list(CASES))
def test_block_loop_is_graph_safe_on_cpu(tiny_base, case):
    """Every block of the loop (the nearest decode: diffusion and rounding write the
    tokens): no factory op, host read or foreign device; it gives what run() gives."""
    s = _sampler(tiny_base.space, case)
    plan = s.plan(2, 3 * s.block_size, prompt_tokens=4)
    rows = [s.encode(p) for p in ROWS]
    plan.set_inputs(rows, [3, 4])
    with _mode("cpu", case) as mode:
        for _ in range(3):
            plan.diffusion.denoise()
    assert mode.ops  # the loop ran under the mode
    assert int(plan.state.generated) == 3 * s.block_size  # advanced on the device
    cap = plan.prompt_cap
    tokens, z = plan.state.tokens[:, cap:].clone(), plan.diffusion.z.clone()
    out = plan.run(ROWS, seed=[3, 4])
    assert torch.equal(out.tokens, tokens) and torch.equal(out.z, z)
    # the output owns its tensors: the next run reuses the plan's buffers
    assert out.tokens.data_ptr() != plan.state.tokens.data_ptr()
    # new seeds and prompts reach the loop through the buffers
    plan.set_inputs([s.encode("I"), s.encode("I")], [5, 6])
    with _mode("cpu", case):
        plan.diffusion.denoise()
    assert not torch.equal(plan.diffusion.z, z)


def _to_meta(space, sampler_case: str) -> Sampler:
    meta_space = dataclasses.replace(space, weight=space.weight.to("meta"))
    return _sampler(meta_space, sampler_case, device="meta")


@pytest.mark.parametrize("case", list(CASES))
def test_block_loop_runs_on_the_meta_device(tiny_base, case):
    """Plan and blocks with every tensor on ``meta``: one made without ``device=`` fails."""
    s = _to_meta(tiny_base.space, case)
    plan = s.plan(2, 2 * s.block_size, prompt_tokens=4)
    assert plan.state.tokens.device.type == "meta"
    with _mode("meta", case):
        for _ in range(2):
            plan.diffusion.denoise()
    assert plan.diffusion.z.shape == (2, s.window, tiny_base.space.dim)
    assert plan.diffusion.z.device.type == "meta" and plan.state.latent.device.type == "meta"


# factory ops the LM decode step may run: transformers' constants (position ranges, mask
# fill values) and the reference Gumbel draw's fixed counters and output
DECODE_CONSTANTS = {
    "allow_factories_from": ("transformers",),
    "allow_factories_in": ("gumbel_argmax", "sample_vocab_reference"),
}


@pytest.mark.parametrize(("latent_weight", "once"), [(0.0, False), (0.5, True)])
def test_lm_block_loop_is_graph_safe(tiny_base, tiny_models, latent_weight, once):
    """The whole block loop with the LM decode after the prefill: each block's diffusion
    and each token's decode step (static KV cache, ragged rows) run without a host read,
    nothing off the device, no factory op outside the constants above; the counters
    advance on the device, and the result is run()'s."""
    denoiser, critic = tiny_models
    lm = DecodeConfig(latent_weight=latent_weight, tilt=1.0, tilt_once=once, tilt_horizon=5 * once)
    cfg = SamplerConfig(steps=3, guidance=1.0, decode="lm", stop_at=0.5, lm=lm, block_size=4)
    critics = [WeightedCritic("sentiment", critic)]
    s = Sampler(denoiser, tiny_base.space, critics, cfg, base_model=tiny_base)
    plan = s.plan(2, 12, prompt_tokens=4)
    decode = plan.decode_plan
    assert decode.static and (plan.diffusion is None) == (latent_weight == 0)
    plan.set_inputs([s.encode(p) for p in ROWS], [3, 4])
    decode.start()  # the prefill: eager, the prompts' lengths vary
    with _mode("cpu", "clean-selfcond", **DECODE_CONSTANTS):
        for _ in range(3):
            if plan.diffusion is not None:
                plan.diffusion.denoise()
            for _ in range(4):
                decode.step()
    cap = plan.prompt_cap
    assert decode.cache_pos.tolist() == [cap + 12] and plan.state.generated.tolist() == [12]
    assert int(decode.noise_step) == DECODE_STEP + 12
    tokens = plan.state.tokens[:, cap:].clone()
    assert torch.equal(plan.run(ROWS, seed=[3, 4]).tokens, tokens)
    # the strict mode does see a step that reads a counter back to the host
    with pytest.raises(GraphSafetyError, match="host"), GraphSafeMode("cpu", **DECODE_CONSTANTS):
        int(plan.state.generated)


# ---- the strict mode sees an unsafe step in the real loop -----------------------------------
def _host_read_layout(original):
    """The block layout reading the generated count back to the host (a sync per block)."""

    def _layout(self):
        original(self)
        self.block_start = int(self.state.generated)

    return _layout


def _host_data_row(original):
    """A denoiser row that builds its step's constants from host data on every call."""

    def _denoise_row(self, z, r):
        self.row_constants = torch.tensor(self._rows[r], device=z.device)
        return original(self, z, r)

    return _denoise_row


def _host_read_step(original):
    """A decode step that reads its cache position back to the host."""

    def step(self):
        self.position = self.cache_pos.item()
        original(self)

    return step


@pytest.mark.parametrize(
    ("target", "unsafe", "message"),
    [
        ("layout", _host_read_layout, "reads a device value back to the host"),
        ("row", _host_data_row, "creates a tensor from host values"),
        ("step", _host_read_step, "reads a device value back to the host"),
    ],
    ids=["block-reads-host", "row-tensor-from-host", "decode-step-reads-host"],
)
def test_strict_mode_catches_an_unsafe_step_in_the_loop(
    tiny_base, tiny_models, monkeypatch, target, unsafe, message
):
    """The loop that the tests above pass runs clean under the mode; with one step made
    unsafe (a host read, a tensor from host data) the very same loop fails, naming it."""
    from fastdia.decode import DecodePlan
    from fastdia.window import WindowDiffusion

    denoiser, critic = tiny_models
    lm = DecodeConfig(latent_weight=0.5)
    cfg = SamplerConfig(steps=3, guidance=1.0, decode="lm", stop_at=0.5, lm=lm, block_size=4)
    s = Sampler(
        denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, base_model=tiny_base
    )
    plan = s.plan(2, 4, prompt_tokens=4)

    def block():
        plan.set_inputs([s.encode(p) for p in ROWS], [3, 4])
        plan.decode_plan.start()
        with _mode("cpu", "clean-selfcond", **DECODE_CONSTANTS):
            plan.diffusion.denoise()
            for _ in range(4):
                plan.decode_plan.step()

    block()  # the safe loop passes
    owner, name = {
        "layout": (WindowDiffusion, "_layout"),
        "row": (WindowDiffusion, "_denoise_row"),
        "step": (DecodePlan, "step"),
    }[target]
    monkeypatch.setattr(owner, name, unsafe(getattr(owner, name)))
    with pytest.raises(GraphSafetyError, match=message):
        block()


def _features_without_device(t, dim):
    """fastdia.models.common.timestep_embedding less its ``device=t.device``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.to(torch.float32) * TIME_SCALE)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("unsafe", [False, True])
def test_meta_run_catches_a_tensor_made_without_device(tiny_base, unsafe):
    """A context critic computes its time features in the loop (a constant the mode
    allows). Built without ``device=`` the tensor lands on the CPU: where the plan is on
    the CPU, so nothing fails there, but in a meta loop it is a CPU tensor and the mode
    fails: what the meta run is for. The shipped critic passes on both devices."""
    case = "adaln-ddim-context-critic"
    for device in ("cpu", "meta"):
        s = _to_meta(tiny_base.space, case) if device == "meta" else _sampler(tiny_base.space, case)
        plan = s.plan(2, s.block_size, prompt_tokens=4)
        if unsafe:
            time = s.critics[-1].module.time  # the context critic's TimeMLP

            def timestep_embedding(t, time=time):  # a name the mode allows factories in
                return time.net(_features_without_device(t, time.features))

            time.forward = timestep_embedding
        mode = _mode(device, case)
        if unsafe and device == "meta":
            with pytest.raises(GraphSafetyError, match="is on cpu"), mode:
                plan.diffusion.denoise()
        else:
            with mode:
                plan.diffusion.denoise()
            assert any("aten.arange" in op for op in mode.ops)  # the critic's features ran


# ---- every block replays the same work on the same buffers ---------------------------------
class _Trace(TorchDispatchMode):
    """Records every op as a CUDA graph would capture it: its name, its non-tensor
    arguments' values and, per tensor argument, ``("tensor", shape, dtype, storage)``
    where ``storage`` is the address of a tensor from outside the traced code (a plan
    buffer, a parameter) and None for one the traced ops made."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self._made: set[int] = set()  # storages the traced ops created

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = []
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                ptr = leaf.untyped_storage().data_ptr()
                outside = None if ptr in self._made else ptr
                seen.append(("tensor", tuple(leaf.shape), leaf.dtype, outside))
            else:
                seen.append(leaf)
        self.ops.append((str(func), tuple(seen)))
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._made.add(leaf.untyped_storage().data_ptr())
        return out

    @property
    def inputs(self) -> set[int]:
        """The storages from outside that the traced ops read or wrote."""
        return {
            leaf[3]
            for _, leaves in self.ops
            for leaf in leaves
            if isinstance(leaf, tuple) and leaf[3] is not None
        }


def _traced(fn) -> _Trace:
    with _Trace() as trace:
        fn()
    return trace


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "case",
    ["clean-selfcond", "x0-clamp-corrector-kappa-stop", "mala-clean-selfcond-context-critic"],
)
def test_every_block_replays_the_same_ops_on_the_same_buffers(tiny_base, case):
    """What one captured CUDA graph replays for every block must be what each block does
    eagerly: the same ops with the same constants on the same buffers (a Python-side
    counter, or a buffer re-bound between blocks, would make a replay repeat block 0).
    The blocks of a run and of a later run (other prompts and seeds, copied into the
    buffers) trace alike, and still write different text block after block."""
    s = _sampler(tiny_base.space, case)
    plan = s.plan(2, 3 * s.block_size, prompt_tokens=4)
    plan.set_inputs([s.encode(p) for p in ROWS], [3, 4])
    blocks = [_traced(plan.diffusion.denoise) for _ in range(3)]
    cap, k = plan.prompt_cap, s.block_size
    assert int(plan.state.generated) == 3 * k
    written = plan.state.tokens[:, cap:].view(2, 3, k)
    assert all(not torch.equal(written[:, i], written[:, j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    plan.set_inputs([s.encode("I"), s.encode("I")], [5, 6])
    blocks.append(_traced(plan.diffusion.denoise))
    first = blocks[0]
    # the loop's inputs are the plan's buffers and the models' weights
    st = plan.state
    for buffer in (st.tokens, st.seeds, st.generated, plan.diffusion.z, plan.diffusion.x0):
        assert _storage(buffer) in first.inputs
    assert _storage(next(s.denoiser.parameters())) in first.inputs
    for j, trace in enumerate(blocks[1:], 1):
        assert len(trace.ops) == len(first.ops), f"block {j} runs other ops than block 0"
        for i, (op, want) in enumerate(zip(trace.ops, first.ops, strict=True)):
            assert op == want, f"block {j}, op {i} differs from block 0's"


def test_every_decode_step_replays_the_same_ops_on_the_same_buffers(tiny_base, tiny_models):
    """The same for the LM decode's per-token step (static KV cache): every position
    traces alike, so one captured step serves every token."""
    denoiser, critic = tiny_models
    lm = DecodeConfig(latent_weight=0.5, tilt=1.0, tilt_once=True)
    cfg = SamplerConfig(steps=2, guidance=1.0, decode="lm", stop_at=0.5, lm=lm, block_size=4)
    s = Sampler(
        denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, base_model=tiny_base
    )
    plan = s.plan(2, 8, prompt_tokens=4)
    decode = plan.decode_plan
    plan.set_inputs([s.encode(p) for p in ROWS], [3, 4])
    decode.start()
    steps = []
    for _ in range(2):
        plan.diffusion.denoise()
        steps += [_traced(decode.step) for _ in range(4)]
    assert plan.state.generated.tolist() == [8]
    first = steps[0]
    for buffer in (decode.h, decode.tok, decode.cache_pos, decode.mask, plan.state.latent):
        assert _storage(buffer) in first.inputs
    for i, trace in enumerate(steps[1:], 1):
        assert trace.ops == first.ops, f"decode step {i} differs from step 0"


def test_cuda_graph_flag_changes_nothing_off_cuda(tiny_base, tiny_models):
    """``cuda_graph`` asks for capture on a CUDA device only: on the CPU a plan with it
    captures nothing and writes exactly what a plan without it writes."""
    denoiser, critic = tiny_models
    outs = []
    for flag in (True, False):
        cfg = SamplerConfig(steps=2, guidance=1.0, cuda_graph=flag, block_size=4)
        s = Sampler(denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg)
        plan = s.plan(2, 8)
        assert not plan.captures and not plan.graphed
        outs.append(plan.run(ROWS, seed=[3, 4]))
    assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].z, outs[1].z)


def test_triton_wrapper_is_graph_safe_with_device_scalars(monkeypatch):
    """The Triton guided_step's host side (kernel launch stubbed out) creates nothing when
    seed, step and guidance are device tensors and ``out`` is given, as the sampler
    passes them; Python numbers cost a ``torch.full`` each."""
    kernels = pytest.importorskip("fastdia.kernels.guided_step")
    launches = []

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    monkeypatch.setattr(kernels, "_guided_step_kernel", _Stub())
    z = torch.zeros(6, 5)
    stack = TokenLocalStack(torch.ones(4, 5), torch.ones(4), torch.ones(4), torch.ones(()))
    coef = torch.ones(4)
    kw = {"seq_len": 3, "critic": stack, "out": torch.empty_like(z)}
    seeds, step, lam = torch.tensor([1, 7]), torch.tensor(2), torch.tensor(0.5)
    with GraphSafeMode("cpu"):
        kernels.guided_step(z, z, coef, seed=seeds, step=step, guidance=lam, **kw)
    with GraphSafeMode("cpu", raise_errors=False) as mode:
        kernels.guided_step(z, z, coef, seed=1, step=2, guidance=0.5, **kw)
    assert len(launches) == 2
    # one seed for the batch becomes per-row seeds (an arange), step and guidance a full each
    assert sum("aten.full" in v for v in mode.violations) == 2
    assert sum("aten.arange" in v for v in mode.violations) == 1
