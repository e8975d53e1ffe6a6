"""Reference ops, their registry, and the public entry points."""

from __future__ import annotations

import pytest
import torch

from fastdia import noise, ops
from fastdia.errors import ConfigError
from fastdia.models.critic import CriticConfig, TokenLocalCritic
from fastdia.ops import TokenLocalStack, registry
from fastdia.ops.guided_step_ref import guided_step_reference
from fastdia.ops.round_to_vocab_ref import round_to_vocab_reference


def _critics(dim, seed=0):
    torch.manual_seed(seed)
    return [TokenLocalCritic(CriticConfig(dim=dim, hidden=h)).eval() for h in (8, 5)]


def test_stack_is_the_weighted_sum_of_critics():
    dim, length = 12, 6
    c1, c2 = _critics(dim)
    t = torch.tensor([0.9, 0.4, 0.1])
    stack = TokenLocalStack.merge([(c1, 0.7), (c2, -1.5)], t)
    assert stack.w1.shape == (13, dim) and stack.b1.shape == (3, 13)
    z = torch.randn(4, length, dim)
    for r in range(3):
        tt = t[r].expand(4)
        v1, g1 = c1.value_and_grad(z, tt)
        v2, g2 = c2.value_and_grad(z, tt)
        from fastdia.ops.guided_step_ref import critic_value_and_grad

        h, g = critic_value_and_grad(z.view(-1, dim), stack.row(r), length)
        torch.testing.assert_close(h, 0.7 * v1 - 1.5 * v2)
        torch.testing.assert_close(g.view_as(z), 0.7 * g1 - 1.5 * g2)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_guided_step_reference_is_the_linear_combination(per_sample, kappa):
    batch, length, dim = 3, 5, 12
    n = batch * length
    c1, c2 = _critics(dim)
    stack = TokenLocalStack.merge([(c1, 1.0), (c2, 0.5)], torch.tensor([0.3])).row(0)
    torch.manual_seed(2)
    z, eps, extra = torch.randn(n, dim), torch.randn(n, dim), torch.randn(n, dim)
    coef = torch.rand(batch, 4) if per_sample else torch.tensor([1.1, -0.3, 0.2, 0.4])
    lam = 2.5
    out, h = guided_step_reference(
        z,
        eps,
        coef,
        seq_len=length,
        seed=7,
        step=3,
        guidance=lam,
        critic=stack,
        grad=extra,
        noise_kappa=kappa,
        return_h=True,
    )
    zb = z.view(batch, length, dim)
    v1, g1 = c1.value_and_grad(zb, 0.3)
    v2, g2 = c2.value_and_grad(zb, 0.3)
    hh = v1 + 0.5 * v2
    g = (g1 + 0.5 * g2).view(n, dim) + extra
    # each sequence draws under its own seed (7 + b), its elements numbered from 0
    zeta = torch.cat([noise.randn(7 + b, 3, length * dim) for b in range(batch)]).view(n, dim)
    rows = coef.expand(batch, 4).repeat_interleave(length, 0)
    s = rows[:, 3:4] * (torch.exp(-kappa * hh).repeat_interleave(length)[:, None] if kappa else 1)
    expected = rows[:, 0:1] * z + rows[:, 1:2] * eps + rows[:, 2:3] * lam * g + s * zeta
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h, hh)


def test_guided_step_without_critic():
    z, eps = torch.randn(8, 4), torch.randn(8, 4)
    out, h = guided_step_reference(
        z, eps, torch.tensor([1.0, 0.0, 5.0, 0.0]), seq_len=4, seed=0, step=1, guidance=3.0
    )
    torch.testing.assert_close(out, z)
    assert h is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_round_to_vocab_reference(dtype, with_bias):
    torch.manual_seed(0)
    weight = torch.randn(1000, 24).to(dtype)
    bias = torch.randn(1000) if with_bias else None
    z = torch.randn(2, 7, 24).to(dtype)
    ids, emb = round_to_vocab_reference(z, weight, bias, return_embeddings=True)
    scores = z.float() @ weight.float().T + (0 if bias is None else bias)
    assert ids.shape == (2, 7) and ids.dtype == torch.int64
    assert torch.equal(ids, scores.argmax(-1))
    assert torch.equal(emb, weight[ids]) and emb.dtype == dtype


def test_round_to_vocab_ties_go_to_the_lowest_id():
    weight = torch.zeros(10, 4)
    weight[[3, 6, 8]] = torch.tensor([1.0, 0, 0, 0])
    ids = ops.round_to_vocab(torch.tensor([[2.0, 0, 0, 0], [-1.0, 0, 0, 0]]), weight)
    assert ids.tolist() == [3, 0]


def test_round_to_vocab_chunks_large_inputs():
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    z = torch.randn(2500, 8)
    assert torch.equal(ops.round_to_vocab(z, weight), (z @ weight.T).argmax(-1))


def test_registry_names_and_errors(monkeypatch):
    assert "reference" in registry.backends(ops.GUIDED_STEP)
    assert registry.resolve_backend(None, ops.GUIDED_STEP, "cpu") == "reference"
    assert registry.resolve_backend("auto", ops.ROUND_TO_VOCAB, "cpu") == "reference"
    with pytest.raises(ConfigError, match=r"unknown backend 'cudnn' .* known: auto, reference"):
        registry.resolve_backend("cudnn", ops.GUIDED_STEP, "cpu")
    monkeypatch.setenv("FASTDIA_BACKEND", "nope")
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        ops.round_to_vocab(torch.zeros(1, 2), torch.zeros(3, 2))


def test_registry_auto_prefers_priority_among_available():
    registry.register("demo_op", "slow", "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference")
    registry.register(
        "demo_op", "fast", "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference", priority=10
    )
    registry.register(
        "demo_op",
        "gpu_only",
        "nowhere:fn",
        priority=20,
        available=lambda device: device.type == "cuda",
    )
    assert registry.resolve_backend("auto", "demo_op", "cpu") == "fast"
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        registry.resolve_backend("gpu_only", "demo_op", "cpu")
    assert registry.get("demo_op", "fast") is round_to_vocab_reference


def test_registry_auto_eligibility_is_separate_from_availability():
    registry.register(
        "demo_auto_op",
        "interp",
        "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference",
        priority=10,
        auto=lambda device: device.type == "cuda",
        hint="try elsewhere",
    )
    registry.register(
        "demo_auto_op", "plain", "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference"
    )
    assert registry.resolve_backend("interp", "demo_auto_op", "cpu") == "interp"  # explicit
    assert registry.resolve_backend("auto", "demo_auto_op", "cpu") == "plain"
    assert registry.resolve_backend("auto", "demo_auto_op", "cuda") == "interp"


def test_triton_variant_auto_only_on_cuda(monkeypatch):
    """``auto`` takes triton on CUDA, never on the CPU (not even under the interpreter,
    which is far slower than the reference); ``--backend triton`` on the CPU needs
    ``TRITON_INTERPRET=1``. Resolving a cuda device initialises nothing."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    for op in ops.SAMPLER_OPS:
        assert "triton" in registry.backends(op)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert registry.resolve_backend("auto", op, "cpu") == "reference"
        assert registry.resolve_backend("triton", op, "cpu") == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        assert registry.resolve_backend("auto", op, "cpu") == "reference"
        assert registry.resolve_backend("auto", op, "cuda") == "triton"
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            registry.resolve_backend("triton", op, "cpu")


def test_public_ops_are_not_shadowed_by_their_reference_modules():
    """Each public op is a function, and no submodule of ``fastdia.ops`` shares its name
    (loading the references lazily, as the registry does, cannot replace the function)."""
    import importlib.util
    import subprocess
    import sys

    for op in ("guided_step", "round_to_vocab", "sample_vocab"):
        assert importlib.util.find_spec(f"fastdia.ops.{op}") is None, op
    code = (
        "import fastdia.ops as o\n"
        "from fastdia.ops import registry\n"
        "for op in ('round_to_vocab', 'guided_step', 'sample_vocab'):\n"
        "    registry.get(op, 'reference')\n"
        "print(o.round_to_vocab.__module__, o.guided_step.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fastdia.ops", "fastdia.ops"]


def test_the_checkout_does_not_shadow_the_pypi_kernels_package():
    """From the repository root (``python -m pytest``, ``python -m benchmarks...``) the folder
    ``kernels/`` is importable as ``kernels``, the name of PyPI's hub-kernels package that
    transformers imports: it must hand over to that package, or be missing like it."""
    import importlib.machinery
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "else:\n    print('found', kernels.__file__)\n"
        "import fastdia.kernels, fastdia.ops.checks\n"
        "print('ours', fastdia.kernels.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert Path(lines["ours"]).resolve() == root / "kernels" / "__init__.py"
    outside = [p for p in sys.path if Path(p or ".").resolve() != root]
    pypi = importlib.machinery.PathFinder.find_spec("kernels", outside)
    if pypi is None:
        assert lines == {"missing": "kernels", "ours": lines["ours"]}
    else:
        assert Path(lines["found"]).resolve() == Path(pypi.origin).resolve()


def _fastdia_imports(path) -> set[str]:
    """The ``fastdia...`` modules a source file imports (anywhere in it, lazily or not)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= (
                {node.module}
                if node.module != "fastdia"
                else {f"fastdia.{a.name}" for a in node.names}
            )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "fastdia" or m.startswith("fastdia.")}


def test_ops_sit_below_the_kernels_and_the_runtime():
    """The layering (docs/design.md): ``kernels/`` import only fastdia's ground floor (ops'
    references and checks, noise, device, errors); ``fastdia/ops/`` never import a kernel
    module or anything above it (profile, sampler, CLI); the registry loads kernels by name."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ground = (
        "fastdia.ops",
        "fastdia.noise",
        "fastdia.device",
        "fastdia.errors",
        "fastdia.cache",
    )
    for path in sorted((root / "kernels").glob("*.py")):
        for module in _fastdia_imports(path):
            assert module.startswith(ground) or module.startswith("fastdia.kernels"), (
                path.name,
                module,
            )
    allowed = (*ground, "fastdia.models.critic", "fastdia.csrc", "fastdia.__version__")
    for path in sorted((root / "fastdia" / "ops").glob("*.py")):
        for module in _fastdia_imports(path):
            assert module.startswith(allowed) and not module.startswith("fastdia.kernels"), (
                path.name,
                module,
            )
