"""The ``cuda`` backend's build machinery on any machine (no GPU needed): the JIT cache key,
the build lock, the arch list, the registry's errors and measured ``auto`` choice, the
setup.py fallback, and the Philox header against the reference noise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from fastdia import noise, ops
from fastdia.errors import ConfigError
from fastdia.ops import cuda_build, measured, registry

ROOT = Path(__file__).resolve().parents[1]


# ---- the cache key and the arch list -------------------------------------------------------


def test_cache_key_changes_with_version_torch_and_archs():
    base = cuda_build.cache_key("0.1.0", "2.13.0+cu128", ["9.0"], cuda_version="12.8", digest="ab")
    assert base == cuda_build.cache_key(
        "0.1.0", "2.13.0+cu128", ["9.0"], cuda_version="12.8", digest="ab"
    )
    others = [
        cuda_build.cache_key("0.2.0", "2.13.0+cu128", ["9.0"], cuda_version="12.8", digest="ab"),
        cuda_build.cache_key("0.1.0", "2.14.0+cu128", ["9.0"], cuda_version="12.8", digest="ab"),
        cuda_build.cache_key("0.1.0", "2.13.0+cu128", ["8.0"], cuda_version="12.8", digest="ab"),
        cuda_build.cache_key("0.1.0", "2.13.0+cu128", ["8.0", "9.0"], cuda_version="12.8"),
        cuda_build.cache_key("0.1.0", "2.13.0+cu128", ["9.0"], cuda_version="13.0", digest="ab"),
        cuda_build.cache_key("0.1.0", "2.13.0+cu128", ["9.0"], cuda_version="12.8", digest="cd"),
    ]
    assert len({base, *others}) == len(others) + 1
    for key in (base, *others):
        assert all(ch.isalnum() or ch in "._-" for ch in key), key


def test_cache_key_sorts_and_deduplicates_the_arch_list():
    a = cuda_build.cache_key("0.1.0", "2.13.0", ["9.0", "8.0", "8.6"])
    b = cuda_build.cache_key("0.1.0", "2.13.0", ["8.6", "sm_80", "90", "9.0"])
    assert a == b and "sm80-86-90" in a
    assert cuda_build.module_name(a) != cuda_build.module_name(b + "x")
    assert cuda_build.module_name(a).isidentifier()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9.0;8.0", ["8.0", "9.0"]),
        ("sm_90, 80 8.6", ["8.0", "8.6", "9.0"]),
        ("9.0a 9.0+PTX 9.0", ["9.0", "9.0+PTX", "9.0a"]),
        ("120;compute_86;10.0", ["8.6", "10.0", "12.0"]),
    ],
)
def test_parse_arch_list(text, expected):
    assert cuda_build.parse_arch_list(text) == expected


def test_arch_list_from_the_environment(monkeypatch):
    monkeypatch.setenv(cuda_build.ARCH_ENV, "9.0 8.0")
    assert cuda_build.arch_list() == ["8.0", "9.0"]
    monkeypatch.setenv(cuda_build.ARCH_ENV, "hopper")
    with pytest.raises(ConfigError, match="FASTDIA_CUDA_ARCH_LIST"):
        cuda_build.arch_list()
    monkeypatch.delenv(cuda_build.ARCH_ENV)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            cuda_build.arch_list()


def test_aot_arch_list_drops_old_archs(monkeypatch):
    monkeypatch.setenv(cuda_build.ARCH_ENV, "7.5;8.0;9.0+PTX")
    assert cuda_build.aot_arch_list() == ["8.0", "9.0+PTX"]
    monkeypatch.delenv(cuda_build.ARCH_ENV)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if not torch.cuda.is_available():
        assert cuda_build.aot_arch_list() == cuda_build.parse_arch_list(
            cuda_build.DEFAULT_AOT_ARCHS
        )


def test_sources_are_where_the_builds_look():
    folder = cuda_build.source_dir()
    assert folder == ROOT / "csrc"
    for name in (*cuda_build.SOURCES, *cuda_build.HEADERS):
        assert (folder / name).is_file(), name
    digest = cuda_build.source_digest()
    assert len(digest) == 12 and digest == cuda_build.source_digest(folder)


# ---- the build lock ------------------------------------------------------------------------


def _fake_build(counter: Path, delay: float):
    def build(build_dir: Path) -> Path:
        with counter.open("a") as f:
            f.write("built\n")
        time.sleep(delay)
        library = build_dir / "fake.so"
        library.write_text("not a library")
        return library

    return build


def test_build_once_builds_once_across_threads(tmp_path):
    counter = tmp_path / "count.txt"
    build_dir = tmp_path / "cache" / "key"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(cuda_build.build_once(build_dir, _fake_build(counter, 0.3)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counter.read_text().count("built") == 1
    assert len(results) == 4 and len(set(results)) == 1
    assert results[0] == (build_dir / "fake.so").resolve()
    # later calls reuse the recorded build
    assert cuda_build.build_once(build_dir, _fake_build(counter, 0.0)) == results[0]
    assert counter.read_text().count("built") == 1


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fastdia.ops import cuda_build

    counter, build_dir = Path(sys.argv[1]), Path(sys.argv[2])

    def build(folder):
        with counter.open("a") as f:
            f.write("built\\n")
        time.sleep(1.0)
        library = folder / "fake.so"
        library.write_text("x")
        return library

    print(cuda_build.build_once(build_dir, build))
    """
)


def test_build_once_builds_once_across_processes(tmp_path):
    counter = tmp_path / "count.txt"
    build_dir = tmp_path / "cache" / "key"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_SCRIPT, str(counter), str(build_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert counter.read_text().count("built") == 1
    assert len({out.strip() for out, _ in outs}) == 1


def test_build_once_retries_after_a_failed_build(tmp_path):
    build_dir = tmp_path / "key"

    def broken(folder: Path) -> Path:
        raise RuntimeError("nvcc failed")

    with pytest.raises(RuntimeError, match="nvcc failed"):
        cuda_build.build_once(build_dir, broken)
    assert cuda_build.built_library(build_dir) is None
    counter = tmp_path / "count.txt"
    library = cuda_build.build_once(build_dir, _fake_build(counter, 0.0))
    assert cuda_build.built_library(build_dir) == library


# ---- the registry and the error messages -------------------------------------------------


def test_cuda_variant_is_registered_but_never_auto_without_a_measurement(monkeypatch):
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    for op in ops.SAMPLER_OPS:
        assert "cuda" in registry.backends(op)
        assert registry.resolve_backend("auto", op, "cpu") == "reference"
    assert "cuda" in registry.known_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backend_cuda_without_a_gpu_fails_with_what_to_install(device):
    for op in ops.SAMPLER_OPS:
        with pytest.raises(ConfigError) as info:
            registry.resolve_backend("cuda", op, device)
        message = str(info.value)
        assert f"backend 'cuda' of {op} cannot run on {device}" in message
        assert "CUDA build of torch" in message and "nvcc" in message and "ninja" in message
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        ops.round_to_vocab(torch.zeros(2, 4), torch.zeros(3, 4), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_cli_backend_cuda_without_a_gpu_fails_clearly(capsys, monkeypatch):
    import fastdia.base_model
    from fastdia.cli import main

    def heavy(*a, **k):
        raise AssertionError("loaded the base model before validating --backend")

    monkeypatch.setattr(fastdia.base_model, "load_base_model", heavy)
    code = main(["sample", "--backend", "cuda", "--random-init"])
    err = capsys.readouterr().err
    assert code == 2
    assert "backend 'cuda'" in err and "cannot run on cpu" in err and "CUDA" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CPU build of torch")
def test_loading_the_extension_on_cpu_torch_raises_config_error():
    with pytest.raises(ConfigError, match="CPU-only build"):
        cuda_build.load_extension()


def test_toolchain_problems_name_the_fix(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "CUDA_HOME" in cuda_build.toolchain_problem()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(cuda_build.importlib.util, "find_spec", lambda name: None)
    assert "pip install ninja" in cuda_build.toolchain_problem()


def test_package_imports_without_a_cuda_toolchain(tmp_path):
    """No nvcc on PATH, no CUDA_HOME: importing fastdia and the cuda modules builds nothing."""
    script = textwrap.dedent(
        """
        import sys
        import fastdia, fastdia.ops, fastdia.ops.cuda_ops, fastdia.ops.cuda_build as cb
        from fastdia.ops import registry
        assert cb._loaded is None
        assert "torch.utils.cpp_extension" not in sys.modules
        assert registry.resolve_backend("auto", "guided_step", "cpu") == "reference"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("skip", [True, False], ids=["skip_env", "no_cuda_torch"])
def test_setup_py_installs_pure_python_with_one_warning(tmp_path, skip):
    if not skip and torch.version.cuda is not None:
        pytest.skip("this torch could build the extension")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(cuda_build.SKIP_ENV, None)
    if skip:
        env[cuda_build.SKIP_ENV] = "1"
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    warnings = [
        line
        for line in result.stderr.splitlines()
        if "installing without the prebuilt CUDA extension" in line
    ]
    assert len(warnings) == 1
    assert ("FASTDIA_SKIP_CUDA_BUILD=1" if skip else "CPU-only build") in warnings[0]


# ---- measured auto -------------------------------------------------------------------------


def test_measurements_are_recorded_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    monkeypatch.setenv(measured.PROFILE_ENV, str(path))
    entry = measured.record(
        "Fake GPU",
        "guided_step",
        {"triton": {"N=64": 0.5, "N=1024": 2.0}, "cuda": {"N=64": 0.4, "N=1024": 2.2}},
    )
    # geometric mean of time over the best time: cuda sqrt(1.1), triton sqrt(1.25)
    assert entry["fastest"] == "cuda"
    assert entry["score"] == {
        "cuda": pytest.approx(1.1**0.5, abs=1e-4),
        "triton": pytest.approx(1.25**0.5, abs=1e-4),
    }
    measured.record("Fake GPU", "round_to_vocab", {"triton": {"a": 0.3}, "cuda": {"a": 0.4}})
    measured.record("Other GPU", "guided_step", {"triton": {"a": 0.1}})
    data = json.loads(path.read_text())
    assert data["devices"]["Fake GPU"]["guided_step"]["fastest"] == "cuda"
    assert data["devices"]["Fake GPU"]["round_to_vocab"]["fastest"] == "triton"
    assert data["devices"]["Other GPU"]["guided_step"]["ms"] == {"triton": {"a": 0.1}}
    monkeypatch.setattr(measured, "device_name", lambda device: "Fake GPU")
    assert measured.fastest("guided_step", "cuda") == "cuda"
    assert measured.fastest("sample_vocab", "cuda") is None
    path.write_text("{not json")
    assert measured.read_profile(path) == {"version": measured.VERSION, "devices": {}}
    assert measured.fastest("guided_step", "cuda") is None
    with pytest.raises(ValueError, match="share no measured shape"):
        measured.record("Fake GPU", "guided_step", {"a": {"x": 1.0}, "b": {"y": 1.0}})


def test_a_fastdia_profile_payload_is_recorded_per_op(tmp_path):
    """The rows of ``fastdia profile`` (fastdia.profile.profile): errors are skipped."""
    rows = [
        {"op": "guided_step", "variant": "triton", "shape": "s1", "ms": 1.0},
        {"op": "guided_step", "variant": "cuda", "shape": "s1", "ms": 0.8},
        {"op": "guided_step", "variant": "reference", "shape": "s1", "ms": 9.0},
        {"op": "round_to_vocab", "variant": "cuda", "shape": "s2", "error": "RuntimeError: x"},
        {"op": "round_to_vocab", "variant": "triton", "shape": "s2", "ms": 0.3},
    ]
    payload = {"environment": {"device": "Fake GPU"}, "rows": rows}
    path = tmp_path / "p.json"
    entries = measured.record_profile(payload, path=path)
    assert entries["guided_step"]["fastest"] == "cuda"
    assert entries["round_to_vocab"]["fastest"] == "triton"
    assert set(json.loads(path.read_text())["devices"]["Fake GPU"]) == set(entries)
    with pytest.raises(ValueError, match="only GPU measurements"):
        measured.record_profile({"environment": {"device": "cpu"}, "rows": rows}, path=path)


def test_auto_prefers_the_measured_variant(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    monkeypatch.setenv(measured.PROFILE_ENV, str(tmp_path / "profile.json"))
    monkeypatch.setattr(measured, "device_name", lambda device: "Fake GPU")
    target = "fastdia.ops.round_to_vocab_ref:round_to_vocab_reference"
    registry.register("demo_measured_op", "static", target, priority=10)
    registry.register("demo_measured_op", "fast", target, auto=lambda device: False)
    registry.register(
        "demo_measured_op", "missing", target, available=lambda device: False, priority=20
    )
    assert registry.resolve_backend("auto", "demo_measured_op", "cuda") == "static"  # no data
    measured.record("Fake GPU", "demo_measured_op", {"static": {"s": 2.0}, "fast": {"s": 1.0}})
    assert registry.resolve_backend("auto", "demo_measured_op", "cuda") == "fast"
    assert registry.resolve_backend("auto", "demo_measured_op", "cpu") == "static"
    assert registry.resolve_backend("static", "demo_measured_op", "cuda") == "static"
    measured.record("Fake GPU", "demo_measured_op", {"static": {"s": 2.0}, "missing": {"s": 0.5}})
    assert registry.resolve_backend("auto", "demo_measured_op", "cuda") == "static"


# ---- the noise header against the reference ------------------------------------------------


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (host code only, no GPU)")
def test_philox_header_is_bit_exact_with_the_reference(tmp_path):
    exe = tmp_path / "philox_host"
    subprocess.run(
        [
            _nvcc(),
            "-std=c++17",
            f"-I{ROOT / 'csrc'}",
            str(ROOT / "tests" / "csrc" / "philox_host.cu"),
            "-o",
            str(exe),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    gen = torch.Generator().manual_seed(0)
    cases = [
        (0, 0, 0),
        (0, 0, 1),
        (5, 2, 123),
        (2**31 - 1, 2**31 - 1, 2**31 - 8),
        (7, 0, 2**31 - 8),
        (7, 0, 2**31 - 11),
    ]
    for _ in range(200):
        seed, step, k = (int(x) for x in torch.randint(0, 2**31 - 8, (3,), generator=gen))
        cases.append((seed, step, k))
    stdin = "".join(f"{s} {t} {k}\n" for s, t, k in cases)
    out = subprocess.run(
        [str(exe)], input=stdin, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split("\n")
    for (seed, step, k), line in zip(cases, out, strict=False):
        fields = line.split()
        words = noise.philox_randint4x(step, seed, torch.tensor([k]))
        assert [int(f) for f in fields[:4]] == [int(w) for w in words], (seed, step, k)
        u1, u2 = (noise._uint32_to_uniform(w) for w in words[:2])
        assert float.fromhex(fields[4]) == float(u1[0]), (seed, step, k)  # exact
        assert float.fromhex(fields[5]) == float(u2[0]), (seed, step, k)
        # the Gaussians of elements k .. k + 6 (the header's lanes and groups), to the
        # rounding of log/cos/sin; the eighth slot of the span is left at zero
        ref = [*noise.randn_at(seed, step, torch.arange(k, k + 7)).tolist(), 0.0]
        got = [float.fromhex(f) for f in fields[6:]]
        assert len(got) == 9, line
        for g, r in zip(got, [ref[0], *ref], strict=True):
            assert abs(g - r) <= 2e-6 * max(1.0, abs(r)), (seed, step, k, got, ref)
