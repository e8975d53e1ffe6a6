"""fastdia.noise: Philox4x32-10 known answers, agreement with Triton's tl.randn4x, statistics."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

from fastdia.errors import ConfigError
from fastdia.noise import (
    _philox4x32,
    philox_randint4x,
    randn,
    randn_at,
    randn_like,
    randn_like_shape,
    triton_key,
)

MAX31 = 2**31 - 1

# Philox4x32-10 known-answer vectors (Random123 kat_vectors): counter words, key words, output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# (seed, step, numel): seed 0 / 2**31 - 1, step 0 / large, numel not a multiple of the block.
TRITON_CASES = [
    (0, 0, 3000),
    (0, 1, 1500),
    (MAX31, 0, 2049),
    (MAX31, MAX31, 1024),
    (12345, 2**30 + 7, 2500),
    (7, 3, 1),
]


@pytest.mark.parametrize(("ctr", "key", "expected"), KAT)
def test_philox_known_answers(ctr, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    out = _philox4x32(*words, *key)
    assert [int(o.item()) for o in out] == list(expected)
    assert all(o.dtype == torch.int64 for o in out)


def test_philox_randint4x_matches_internal_and_is_vectorised():
    counters = torch.arange(0, 2**32, 2**22 + 12345, dtype=torch.int64)
    out = philox_randint4x(0xA4093822, 0x299F31D0, counters)
    zero = torch.zeros_like(counters)
    ref = _philox4x32(counters, zero, zero, zero, 0xA4093822, 0x299F31D0)
    for a, b in zip(out, ref, strict=True):
        assert a.shape == counters.shape
        assert torch.equal(a, b)
        assert int(a.min()) >= 0 and int(a.max()) <= 0xFFFFFFFF
    # The counter = 0, key = 0 KAT through the public entry point.
    first = philox_randint4x(0, 0, torch.zeros(3, dtype=torch.int32))
    assert [int(w[1]) for w in first] == list(KAT[0][2])


def test_philox_randint4x_rejects_bad_key():
    with pytest.raises(ConfigError, match="k0"):
        philox_randint4x(2**32, 0, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ConfigError, match="k1"):
        philox_randint4x(0, -1, torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize(("seed", "step", "numel"), TRITON_CASES)
def test_randint4x_matches_triton(seed, step, numel):
    pytest.importorskip("triton")
    from fastdia.kernels.randn import randint4x_triton

    got = randint4x_triton(seed, step, numel, device="cpu")
    ours = torch.stack(philox_randint4x(step, seed, torch.arange(numel)))
    assert got.shape == (4, numel)
    assert torch.equal(got, ours)


@pytest.mark.parametrize(("seed", "step", "numel"), TRITON_CASES)
def test_randn_matches_triton(seed, step, numel):
    pytest.importorskip("triton")
    from fastdia.kernels.randn import randn_triton

    got = randn_triton(seed, step, numel, device="cpu")
    ours = randn(seed, step, numel)
    assert got.dtype == ours.dtype == torch.float32
    torch.testing.assert_close(ours, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [1, 1000, 1023, 1024])
def test_randn_offset_matches_triton_slice(offset):
    pytest.importorskip("triton")
    from fastdia.kernels.randn import randn_triton

    seed, step, numel = 99, 5, 1100
    full = randn_triton(seed, step, offset + numel, device="cpu")
    ours = randn(seed, step, numel, offset=offset)
    torch.testing.assert_close(ours, full[offset:], rtol=1e-5, atol=1e-5)


def _normals_f64(words: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Triton's uniform map and ``randn4x`` Box-Muller from the four Philox words of each
    group, in float64: ``[groups, 4]`` (the lanes)."""

    def uniform(w: torch.Tensor) -> torch.Tensor:
        s = torch.where(w >= 2**31, w - 2**32, w)  # bitcast to int32
        s = torch.where(s < 0, -s - 1, s)
        return s.double() * 4.6566127342e-10

    u1, u2, u3, u4 = (uniform(w) for w in words)
    r12 = torch.sqrt(-2.0 * torch.log(u1.clamp(min=1e-7)))
    r34 = torch.sqrt(-2.0 * torch.log(u3.clamp(min=1e-7)))
    th2, th4 = 6.283185307179586 * u2, 6.283185307179586 * u4
    return torch.stack(
        (r12 * torch.cos(th2), r12 * torch.sin(th2), r34 * torch.cos(th4), r34 * torch.sin(th4)),
        dim=-1,
    )


@pytest.mark.parametrize("offset", [0, 1, 2**20 + 3, 2**31 - 4096, 2**31 - 4097])
def test_randn_float_map_matches_float64_reference(offset):
    # Element k is lane k % 4 of the draw at counter k // 4; indices up to 2**31 - 1
    # (beyond what the interpreter can afford to run).
    n = 4096
    got = randn(3, 4, n, offset=offset)
    index = torch.arange(offset, offset + n)
    lanes = _normals_f64(philox_randint4x(4, 3, index // 4))
    expected = lanes.gather(1, (index % 4)[:, None])[:, 0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_one_draw_serves_four_elements():
    # the four lanes of a group come from one Philox draw: the cos/sin pairs share a radius
    x = randn(11, 3, 4000).view(-1, 4).double()
    assert torch.allclose(
        x[:, 0] ** 2 + x[:, 1] ** 2,
        _normals_f64(philox_randint4x(3, 11, torch.arange(1000)))[:, :2].pow(2).sum(1),
        rtol=1e-5,
        atol=1e-5,
    )
    # and the lanes are uncorrelated standard normals
    big = randn(2025, 7, 400_000).view(-1, 4).double()
    corr = torch.corrcoef(big.T)
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 0.01  # se ~ 0.003
    assert (big.std(0) - 1).abs().max() < 0.01


def test_randn_at_and_randn_like_match_randn():
    gen = torch.Generator().manual_seed(3)
    full = randn(17, 9, 5003)
    index = torch.randint(0, 5003, (7, 11), generator=gen)
    torch.testing.assert_close(randn_at(17, 9, index), full[index], rtol=1e-6, atol=1e-6)
    like = torch.empty(3, 1667)  # 5001 elements: a last group of one
    got = randn_like(17, 9, like)
    torch.testing.assert_close(got, full[:5001].view(3, 1667), rtol=0, atol=0)
    seed, step = torch.tensor(17), torch.tensor([9])
    torch.testing.assert_close(randn_like(seed, step, like), got, rtol=0, atol=0)
    torch.testing.assert_close(randn_at(seed, step, index), full[index], rtol=1e-6, atol=1e-6)


def test_statistics():
    x = randn(2024, 1, 1_000_000).double()
    assert abs(x.mean().item()) < 5e-3  # standard error 1e-3
    assert abs(x.std().item() - 1.0) < 5e-3
    assert abs((x**3).mean().item()) < 2e-2
    assert abs((x**4).mean().item() - 3.0) < 5e-2
    assert x.abs().max().item() < 6.0  # |z| <= sqrt(-2 log 1e-7) ~ 5.68 by construction


def test_determinism_and_distinct_streams():
    a = randn(1, 2, 4096)
    assert torch.equal(a, randn(1, 2, 4096))
    for other in (randn(1, 3, 4096), randn(2, 2, 4096), randn(0, 2, 4096)):
        assert not torch.equal(a, other)
        assert torch.corrcoef(torch.stack((a, other)))[0, 1].abs() < 0.1


def test_offset_shifts_the_stream():
    full = randn(5, 6, 3000)
    assert torch.equal(randn(5, 6, 1000, offset=2000), full[2000:])
    assert torch.equal(randn(5, 6, 0, offset=17), full[:0])


def test_dtype_device_and_shape():
    x = randn(1, 1, 100, dtype=torch.bfloat16, device="cpu")
    assert x.dtype == torch.bfloat16 and x.shape == (100,)
    assert torch.equal(x, randn(1, 1, 100).to(torch.bfloat16))
    y = randn_like_shape(1, 1, (4, 5, 6), dtype=torch.float64)
    assert y.shape == (4, 5, 6) and y.dtype == torch.float64 and y.is_contiguous()
    assert torch.equal(y.reshape(-1), randn(1, 1, 120).double())
    assert randn_like_shape(1, 1, ()).shape == ()
    assert randn_like_shape(1, 1, [0, 3]).shape == (0, 3)


def test_triton_key():
    assert triton_key(0, 0) == 0
    assert triton_key(1, 2) == (1 << 32) | 2
    assert triton_key(MAX31, MAX31) == (MAX31 << 32) | MAX31


@pytest.mark.parametrize(
    ("seed", "step", "name"),
    [(-1, 0, "seed"), (2**31, 0, "seed"), (0, -1, "step"), (0, 2**31, "step"), (1.5, 0, "seed")],
)
def test_bad_seed_or_step_raise(seed, step, name):
    with pytest.raises(ConfigError, match=rf"{name}.*2\*\*31"):
        randn(seed, step, 4)
    with pytest.raises(ConfigError, match=name):
        randn_like_shape(seed, step, (2, 2))
    with pytest.raises(ConfigError, match=name):
        triton_key(seed, step)


def test_bad_numel_offset_dtype_shape_raise():
    with pytest.raises(ConfigError, match="numel"):
        randn(0, 0, -1)
    with pytest.raises(ConfigError, match="offset"):
        randn(0, 0, 4, offset=-1)
    with pytest.raises(ConfigError, match="2\\*\\*31"):
        randn(0, 0, 10, offset=2**31 - 5)
    with pytest.raises(ConfigError, match="dtype"):
        randn(0, 0, 4, dtype=torch.int32)
    with pytest.raises(ConfigError, match="shape"):
        randn_like_shape(0, 0, (2, -1))


def test_randn_triton_rejects_bad_seed():
    pytest.importorskip("triton")
    from fastdia.kernels.randn import randn_triton

    with pytest.raises(ConfigError, match="seed"):
        randn_triton(2**31, 0, 8, device="cpu")


def test_package_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, fastdia, fastdia.noise, fastdia.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_randn_at_matches_randn_at_scattered_indices():
    full = randn(11, 4, 5000)
    index = torch.tensor([[0, 17, 4999], [2500, 3, 3]])
    torch.testing.assert_close(randn_at(11, 4, index), full[index], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="integer tensor"):
        randn_at(11, 4, torch.zeros(2))
