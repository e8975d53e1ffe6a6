"""Build and load fastdia's CUDA C++ extension (``csrc/``): ahead of time or just in time.

The extension registers the ops ``torch.ops.fastdia_cuda.*`` (``TORCH_LIBRARY`` in
``csrc/ops.cpp``) and is found, in order:

1. **Prebuilt** by ``setup.py`` as ``fastdia._C_cuda`` when fastdia was installed with a
   CUDA toolchain and a CUDA build of torch in the build environment
   (``pip install --no-build-isolation .``); skipped with ``FASTDIA_CUDA_JIT=1``.
2. **Built just in time** on first use with ``torch.utils.cpp_extension.load`` and ninja,
   cached under ``$FASTDIA_CUDA_CACHE`` (default ``$FASTDIA_CACHE/cuda``, i.e.
   ``~/.cache/fastdia/cuda``) in a folder named by :func:`cache_key`: fastdia's version,
   torch's version and CUDA version, the sorted arch list and a digest of the sources. A
   file lock around the build makes parallel processes (and threads) build once; the
   others wait and load the result.

The arch list comes from ``$FASTDIA_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``, ``"sm_90"``,
``"9.0+PTX"``; separated by ``;``, ``,`` or spaces), else from the visible devices. Nothing
builds at import: :func:`load_extension` runs on the first call of a ``cuda`` variant.

This module imports only the standard library at module level (``setup.py`` loads it by
path to share :data:`SOURCES` and the compiler flags); torch is imported inside functions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NAMESPACE = "fastdia_cuda"  # the TORCH_LIBRARY namespace: torch.ops.fastdia_cuda
PREBUILT_MODULE = "fastdia._C_cuda"  # the extension setup.py builds ahead of time
SOURCES = ("ops.cpp", "guided_step.cu", "round_to_vocab.cu")  # compiled, relative to csrc/
HEADERS = ("bindings.h", "common.cuh", "philox.cuh", "guided_step.cuh", "round_to_vocab.cuh")
ARCH_ENV = "FASTDIA_CUDA_ARCH_LIST"
CACHE_ENV = "FASTDIA_CUDA_CACHE"
JIT_ENV = "FASTDIA_CUDA_JIT"  # "1": ignore a prebuilt extension, always build just in time
SKIP_ENV = "FASTDIA_SKIP_CUDA_BUILD"  # "1": setup.py installs pure Python
MIN_CAPABILITY = (8, 0)  # bf16 WMMA and TF32 tensor cores (Ampere)
DEFAULT_AOT_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # setup.py's list when nothing else says
LIBRARY_RECORD = "LIBRARY"  # in a build folder: the path of the built library

INSTALL_HINT = (
    "the cuda backend needs an NVIDIA GPU of compute capability >= 8.0, a CUDA build of "
    "torch (https://pytorch.org/get-started/locally/), and either fastdia installed with "
    "the extension prebuilt (pip install --no-build-isolation . with nvcc present) or the "
    "CUDA toolkit (nvcc, CUDA_HOME) plus ninja (pip install ninja) to build it on first use"
)

_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(\+ptx)?$", re.IGNORECASE)
_LOAD_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()  # serialises builds inside one process (the file lock across)
_loaded: str | None = None


# ---- sources and flags (shared with setup.py) ---------------------------------------------


def source_dir() -> Path | None:
    """The folder holding the C++/CUDA sources: the installed package data
    (``fastdia/csrc``), else the checkout's ``csrc/``; None if neither has them."""
    here = Path(__file__).resolve().parent  # fastdia/ops
    for candidate in (here.parent / "csrc", here.parents[1] / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    return None


def nvcc_flags() -> list[str]:
    """nvcc flags of both builds (torch adds its own defines; no fast math: the noise and
    the critic must match the reference)."""
    return ["-O3", "-std=c++17", "-lineinfo"]


def cxx_flags() -> list[str]:
    """Host compiler flags of both builds."""
    return ["-O3", "-std=c++17"]


def source_digest(folder: Path | None = None) -> str:
    """A short digest of every source and header (so an edited source gets a new cache key)."""
    folder = folder or source_dir()
    sha = hashlib.sha256()
    if folder is not None:
        for name in (*SOURCES, *HEADERS):
            path = folder / name
            sha.update(name.encode())
            sha.update(path.read_bytes() if path.is_file() else b"")
    return sha.hexdigest()[:12]


# ---- arch lists ---------------------------------------------------------------------------


def _arch_sort_key(arch: str) -> tuple[int, int, str, bool]:
    match = _ARCH_RE.match(arch)
    assert match is not None  # canonical entries only
    return (int(match[1]), int(match[2]), match[3], bool(match[4]))


def canonical_arch(entry: str) -> str:
    """``"sm_90"``, ``"90"``, ``"9.0"``, ``"9.0a"``, ``"compute_90+PTX"`` -> ``"9.0"``,
    ``"9.0a"``, ``"9.0+PTX"`` (torch's ``TORCH_CUDA_ARCH_LIST`` spelling).

    Raises:
        ConfigError: the entry is not a compute capability.
    """
    match = _ARCH_RE.match(entry.strip())
    if match is None:
        from fastdia.errors import ConfigError

        raise ConfigError(
            f"bad CUDA arch {entry!r} in ${ARCH_ENV}: use compute capabilities such as "
            "'8.0;9.0', '9.0a' or '9.0+PTX'"
        )
    major, minor, suffix, ptx = match.groups()
    if minor is None:  # "90" -> 9.0, "120" -> 12.0
        major, minor = major[:-1] or "0", major[-1]
    return f"{int(major)}.{int(minor)}{suffix.lower()}{'+PTX' if ptx else ''}"


def sort_archs(archs: Iterable[str]) -> list[str]:
    """Canonical, deduplicated and sorted by compute capability."""
    return sorted({canonical_arch(a) for a in archs if a.strip()}, key=_arch_sort_key)


def parse_arch_list(text: str) -> list[str]:
    """An arch list string (``;``, ``,`` or whitespace separated) -> :func:`sort_archs`."""
    return sort_archs(re.split(r"[;,\s]+", text.strip()))


def arch_list() -> list[str]:
    """The archs to build for: ``$FASTDIA_CUDA_ARCH_LIST``, else the visible devices.

    Raises:
        ConfigError: neither gives an arch (no visible device and no variable).
    """
    text = os.environ.get(ARCH_ENV, "").strip()
    if text:
        return parse_arch_list(text)
    import torch

    if not torch.cuda.is_available():
        from fastdia.errors import ConfigError

        raise ConfigError(f"no CUDA device is visible to build for: set ${ARCH_ENV}, e.g. '9.0'")
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sort_archs(f"{major}.{minor}" for major, minor in caps)


def aot_arch_list() -> list[str]:
    """setup.py's archs: ``$FASTDIA_CUDA_ARCH_LIST``, else ``$TORCH_CUDA_ARCH_LIST``, else
    the visible devices, else :data:`DEFAULT_AOT_ARCHS`; archs below 8.0 are dropped."""
    text = os.environ.get(ARCH_ENV) or os.environ.get("TORCH_CUDA_ARCH_LIST") or ""
    if text.strip():
        archs = parse_arch_list(text)
    else:
        try:
            archs = arch_list()
        except Exception:  # no device visible (a build machine): the default list
            archs = parse_arch_list(DEFAULT_AOT_ARCHS)
    kept = [a for a in archs if _arch_sort_key(a)[:2] >= MIN_CAPABILITY]
    if len(kept) < len(archs):
        log.warning(
            "fastdia's CUDA kernels need compute capability >= 8.0: skipping %s",
            ", ".join(sorted(set(archs) - set(kept))),
        )
    return kept or parse_arch_list(DEFAULT_AOT_ARCHS)


# ---- the just-in-time cache ---------------------------------------------------------------


def cache_key(
    version: str,
    torch_version: str,
    archs: Iterable[str],
    *,
    cuda_version: str | None = None,
    digest: str = "",
) -> str:
    """The name of a build folder: one per fastdia version, torch (and CUDA) version, sorted
    arch list and source digest. Only ``[A-Za-z0-9._-]`` characters."""
    arch_part = "-".join(a.replace(".", "").replace("+PTX", "ptx") for a in sort_archs(archs))
    parts = [
        f"fastdia{version}",
        f"torch{torch_version}",
        f"cu{cuda_version}" if cuda_version else "",
        f"sm{arch_part}",
        digest,
    ]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(p for p in parts if p))


def module_name(key: str) -> str:
    """A valid, per-key library name (two keys never share a ``.so`` in one process)."""
    return f"{NAMESPACE}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cache_root() -> Path:
    """``$FASTDIA_CUDA_CACHE``, else ``cuda/`` in fastdia's cache folder (``$FASTDIA_CACHE``,
    default ``~/.cache/fastdia``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from fastdia.cache import cache_root as fastdia_cache

    return fastdia_cache() / "cuda"


def current_cache_key() -> str:
    """:func:`cache_key` for this process: fastdia, torch, CUDA, :func:`arch_list`, sources."""
    import torch

    from fastdia import __version__

    return cache_key(
        __version__,
        torch.__version__,
        arch_list(),
        cuda_version=torch.version.cuda,
        digest=source_digest(),
    )


def built_library(build_dir: Path) -> Path | None:
    """The library recorded in ``build_dir`` by a finished build, if it still exists."""
    record = build_dir / LIBRARY_RECORD
    try:
        path = Path(record.read_text().strip())
    except OSError:
        return None
    return path if path.is_file() else None


def build_once(build_dir: Path, build: Callable[[Path], Path], *, wait_log: bool = True) -> Path:
    """Run ``build(build_dir) -> library path`` unless a finished build is recorded there.

    Holds a file lock (``<build_dir>.lock``) around the check and the build, so that of many
    processes or threads asking at once exactly one builds and the others wait for it and
    reuse its result. The path is recorded (atomically) only after the build returns, so a
    crashed build is retried.
    """
    from filelock import FileLock, Timeout  # a dependency of torch

    build_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(build_dir) + ".lock")
    with _BUILD_LOCK:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if wait_log:
                log.info("another process is building %s; waiting for it", build_dir.name)
            lock.acquire()
        try:
            done = built_library(build_dir)
            if done is not None:
                return done
            build_dir.mkdir(parents=True, exist_ok=True)
            library = Path(build(build_dir)).resolve()
            tmp = build_dir / (LIBRARY_RECORD + ".tmp")
            tmp.write_text(str(library))
            os.replace(tmp, build_dir / LIBRARY_RECORD)
            return library
        finally:
            lock.release()


@contextmanager
def _torch_arch_env(archs: list[str]) -> Iterator[None]:
    """``TORCH_CUDA_ARCH_LIST`` set to ``archs`` for torch's extension builder, then restored."""
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def _jit_compile(build_dir: Path, *, name: str, archs: list[str]) -> Path:
    """Compile (and load) the extension into ``build_dir`` with ninja; returns the library."""
    from torch.utils import cpp_extension

    folder = source_dir()
    assert folder is not None
    log.warning(
        "building fastdia's CUDA extension for sm %s in %s (once per version and arch; "
        "about a minute)",
        ", ".join(archs),
        build_dir,
    )
    with _torch_arch_env(archs):
        path = cpp_extension.load(
            name=name,
            sources=[str(folder / s) for s in SOURCES],
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=nvcc_flags(),
            extra_include_paths=[str(folder)],
            build_directory=str(build_dir),
            verbose=log.isEnabledFor(logging.DEBUG),
            is_python_module=False,
        )
    return Path(path)


# ---- availability and loading -------------------------------------------------------------


def _prebuilt_path() -> str | None:
    """The file of the prebuilt extension, located without importing it."""
    if os.environ.get(JIT_ENV) == "1":
        return None
    try:
        spec = importlib.util.find_spec(PREBUILT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def toolchain_problem() -> str | None:
    """Why the extension cannot be built just in time here (None: nvcc and ninja found)."""
    if source_dir() is None:
        return "the csrc/ sources are not installed with this fastdia"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return (
            "no CUDA toolkit found to build the extension: install one (nvcc) matching torch's "
            "CUDA version and set CUDA_HOME"
        )
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _device_problem(device_type: str, index: int | None) -> str | None:
    """What keeps the device from running the kernels, with what to install; None: nothing."""
    import torch

    usable = torch.version.cuda is not None and torch.cuda.is_available()
    if device_type != "cuda":
        where = f"the cuda variant runs on CUDA devices only, not on {device_type}"
        if usable:
            return f"{where}: pass a CUDA device (--device cuda)"
        return f"{where}, and this machine has none usable; {INSTALL_HINT}"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; {INSTALL_HINT}"
    if not usable:
        return (
            f"no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES); {INSTALL_HINT}"
        )
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return f"{name} has compute capability {cap[0]}.{cap[1]}; the kernels need >= 8.0"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the ``cuda`` variant cannot run on ``device``, with what to install; None if it can
    (the extension is loaded, prebuilt, cached for this key, or buildable here).

    Cached per device for the process (``auto`` asks on every dispatch);
    :func:`clear_availability_cache` forgets it.
    """
    return _unavailable_reason(device.type, device.index)


@functools.lru_cache(maxsize=16)
def _unavailable_reason(device_type: str, index: int | None) -> str | None:
    problem = _device_problem(device_type, index)
    if problem is not None:
        return problem
    if _loaded is not None or _prebuilt_path() is not None:
        return None
    try:
        if built_library(cache_root() / current_cache_key()) is not None:
            return None
    except Exception as exc:  # a bad $FASTDIA_CUDA_ARCH_LIST
        return str(exc)
    problem = toolchain_problem()
    return None if problem is None else f"{problem}; {INSTALL_HINT}"


def clear_availability_cache() -> None:
    """Forget the cached :func:`unavailable_reason` answers (after installing something)."""
    _unavailable_reason.cache_clear()


def available(device: torch.device) -> bool:
    """Whether the ``cuda`` variant can run on ``device`` (nothing is built to find out)."""
    return unavailable_reason(device) is None


def hint(device: torch.device) -> str:
    """The registry's hint for a request of ``cuda`` where it cannot run."""
    return unavailable_reason(device) or INSTALL_HINT


def load_extension() -> str:
    """Load the extension into this process once (prebuilt, else built just in time).

    Returns the library's path. Raises :class:`fastdia.errors.ConfigError` naming the
    problem and what to install when it cannot be loaded or built.
    """
    global _loaded
    with _LOAD_LOCK:
        if _loaded is not None:
            return _loaded
        import torch

        from fastdia.errors import ConfigError

        if torch.version.cuda is None:
            raise ConfigError(
                f"this torch ({torch.__version__}) is a CPU-only build; {INSTALL_HINT}"
            )
        prebuilt = _prebuilt_path()
        if prebuilt is not None:
            try:
                torch.ops.load_library(prebuilt)
            except OSError as exc:
                log.warning(
                    "the prebuilt %s does not load (%s; built for another torch?): building "
                    "just in time instead",
                    PREBUILT_MODULE,
                    exc,
                )
            else:
                _loaded = prebuilt
                log.info("loaded the prebuilt CUDA extension %s", prebuilt)
                return prebuilt
        problem = toolchain_problem()
        key = current_cache_key()
        build_dir = cache_root() / key
        if problem is not None and built_library(build_dir) is None:
            raise ConfigError(f"cannot build the CUDA extension: {problem}; {INSTALL_HINT}")
        archs = arch_list()
        build = functools.partial(_jit_compile, name=module_name(key), archs=archs)
        try:
            library = build_once(build_dir, build)
        except (RuntimeError, OSError, ImportError) as exc:
            raise ConfigError(
                f"building fastdia's CUDA extension in {build_dir} failed: {exc}. Check that "
                f"nvcc ({os.environ.get('CUDA_HOME', 'CUDA_HOME unset')}) matches torch's CUDA "
                f"{torch.version.cuda}, or use the triton or reference backend"
            ) from exc
        torch.ops.load_library(str(library))  # a no-op when the build just loaded it
        _loaded = str(library)
        log.info("loaded the CUDA extension %s", library)
        return _loaded


def aot_skip_reason() -> str | None:
    """Why ``setup.py`` installs without the prebuilt extension (None: build it)."""
    if os.environ.get(SKIP_ENV) == "1":
        return f"{SKIP_ENV}=1"
    if source_dir() is None:
        return "the csrc/ sources are missing"
    if importlib.util.find_spec("torch") is None:
        return (
            "torch is not importable in the build environment (pip builds in an isolated "
            "environment: pip install --no-build-isolation . builds the extension)"
        )
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    return None


__all__ = [
    "ARCH_ENV",
    "CACHE_ENV",
    "NAMESPACE",
    "PREBUILT_MODULE",
    "SOURCES",
    "aot_arch_list",
    "aot_skip_reason",
    "arch_list",
    "available",
    "build_once",
    "cache_key",
    "cache_root",
    "clear_availability_cache",
    "hint",
    "load_extension",
    "parse_arch_list",
    "sort_archs",
    "unavailable_reason",
]

if __name__ == "__main__":  # pragma: no cover - manual use: python -m fastdia.ops.cuda_build
    logging.basicConfig(level=logging.INFO)
    sys.stdout.write(load_extension() + "\n")
