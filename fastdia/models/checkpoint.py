"""Saving and loading models as safetensors + JSON, atomically, bound to a base model.

A model ``<stem>`` in a folder is two files: ``<stem>.safetensors`` (the weights) and
``<stem>.json``::

    {"format": "fastdia", "version": 1, "kind": "denoiser" | "critic" | "proposal",
     "config": {...the model's config dataclass...},
     "embedding": {"fingerprint": "...", "scale": c, "base_model": "smollm2-135m"}}

Each file is written to a temporary name in the same folder, flushed to disk and renamed
over the target, so a reader sees either the old file or the new one, never half of one.
A checkpoint folder holds ``denoiser.*`` and one ``critic-<name>.*`` per critic, optionally
``value-<name>.*`` value critics, ``proposal.*`` (an amortised proposal,
:mod:`fastdia.models.proposal`) and ``sampling.json``, the sampling defaults its
evaluation recommends (e.g. ``{"guidance": 64}``), which ``fastdia sample`` uses for
options not given.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdia.embedding import EmbeddingSpace
from fastdia.errors import CheckpointError
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.models.proposal import AmortisedProposal, ProposalConfig
from fastdia.settings import EVAL_KEYS, SAMPLING_KEYS

FORMAT, VERSION = "fastdia", 1
DENOISER_STEM = "denoiser"
CRITIC_PREFIX = "critic-"
VALUE_PREFIX = "value-"  # value critics (kind "value"): apart, so one reward can have both
PROPOSAL_STEM = "proposal"  # the amortised proposal (train-proposal)
SAMPLING_DEFAULTS = "sampling.json"


def _umask() -> int:
    """The process's umask (read once, at import: setting it is process-wide)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_name)`` and rename it into place, with the mode a
    plain ``open`` would give it (``mkstemp`` makes its file private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries a killed :func:`write_atomic` left in ``folder`` (not below).

    Only names of :func:`write_atomic`'s pattern (``.NAME.XXXX.tmp``) are touched; call it
    when no write is under way (``--resume`` does). Returns the removed paths.
    """
    folder = Path(folder)
    removed = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def critic_stem(reward: str, kind: str = "token_local") -> str:
    """File stem of the critic of ``reward`` (``"critic-" + a filename-safe slug``; a
    value critic's is ``"value-" + the slug``)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", reward).strip("_") or "reward"
    return (VALUE_PREFIX if kind == "value" else CRITIC_PREFIX) + slug[:80]


def save_model(
    module: nn.Module, folder: str | Path, stem: str, *, space: EmbeddingSpace, base_model: str
) -> None:
    """Save a :class:`Denoiser`, a critic or an amortised proposal as
    ``folder/stem.{safetensors,json}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    kind = "denoiser" if isinstance(module, Denoiser) else "critic"
    if isinstance(module, AmortisedProposal):
        kind = "proposal"
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": asdict(module.config),
        "embedding": {
            "fingerprint": space.fingerprint,
            "scale": space.scale,
            "base_model": base_model,
        },
    }
    write_atomic(folder / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json_atomic(folder / f"{stem}.json", meta)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; re-save or re-train the model")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt ({exc}); re-save it") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastdia model config; re-save the model")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('version')}, this fastdia reads {VERSION}"
        )
    return meta


def load_model(
    folder: str | Path, stem: str, space: EmbeddingSpace, *, device: torch.device | str = "cpu"
) -> nn.Module:
    """Load ``folder/stem``, checking that it was made for ``space``'s base model.

    Raises:
        CheckpointError: a file is missing or corrupt, or the embedding fingerprint differs.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_meta(folder / f"{stem}.json")
    weights = folder / f"{stem}.safetensors"
    space.check_fingerprint(meta.get("embedding", {}).get("fingerprint", ""), f"{weights}")
    try:
        if meta["kind"] == "denoiser":
            module: nn.Module = Denoiser(DenoiserConfig(**meta["config"]))
        elif meta["kind"] == "proposal":
            module = AmortisedProposal(ProposalConfig(**meta["config"]))
        else:
            module = build_critic(CriticConfig(**meta["config"]))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / stem}.json has an invalid config ({exc})") from exc
    if not weights.is_file():
        raise CheckpointError(f"checkpoint file {weights} is missing; re-save or re-train")
    try:
        state = load_file(weights)
        module.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint file {weights} is corrupt or does not match its config "
            f"({str(exc).splitlines()[0]}); re-save it"
        ) from exc
    if isinstance(module, Denoiser):
        module.bind_embeddings(space)
    return module.to(device).eval().requires_grad_(False)


NOTE_KEYS = ("why",)  # free-text keys of sampling.json (explanations, not settings)


PER_REWARD = "per_reward"
"""The ``sampling.json`` key of per-reward defaults: ``{"per_reward": {"nontoxic": {...}}}``
holds, per reward name, settings that replace the top-level ones when that reward guides
alone (``--reward nontoxic``, any weight or argument); a mixture of rewards uses the
top-level settings."""
SHARED_KEYS = ("block_size", "critic_kind")
"""Settings every reward shares (a server batches all rewards with one block size)."""


def sampling_defaults(folder: str | Path, reward: str | None = None) -> dict[str, Any]:
    """The sampling settings ``folder/sampling.json`` recommends (``{}`` without one), for
    the guiding ``reward`` spec where the file has per-reward defaults (:data:`PER_REWARD`).

    The file is a JSON object whose keys are among :data:`SAMPLING_KEYS` (each of the
    ``fastdia sample`` option of the same name), :data:`EVAL_KEYS` (``fastdia eval``'s
    baselines), :data:`NOTE_KEYS` (text) and :data:`PER_REWARD`; values are checked for
    type here and for range when the sampler's config is built.

    Raises:
        CheckpointError: the file is not such an object.
    """
    path = Path(folder) / SAMPLING_DEFAULTS
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object; fix or delete it")
    per_reward = values.pop(PER_REWARD, {})
    if not isinstance(per_reward, dict) or not all(
        isinstance(v, dict) for v in per_reward.values()
    ):
        raise CheckpointError(
            f'{path}: "{PER_REWARD}" must map reward names to objects of settings; fix it'
        )
    values = _checked_settings(path, values, "")
    for name, entry in per_reward.items():
        shared = sorted(set(entry) & set(SHARED_KEYS))
        if shared:
            raise CheckpointError(
                f'{path}: "{PER_REWARD}.{name}" sets {", ".join(shared)}, which every reward '
                "shares; set it at the top level"
            )
        per_reward[name] = _checked_settings(path, dict(entry), f"{PER_REWARD}.{name}.")
    if reward is not None:
        from fastdia.rewards.registry import parse_reward_spec

        names = {name for name, _, _ in parse_reward_spec(reward)}
        if len(names) == 1 and (name := names.pop()) in per_reward:
            values = values | per_reward[name]
    return values


def _checked_settings(path: Path, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (one level of ``sampling.json``) checked for known keys and value types;
    the notes kept as they are."""
    notes = {k: values.pop(k) for k in NOTE_KEYS if isinstance(values.get(k), str)}
    known = SAMPLING_KEYS | EVAL_KEYS
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise CheckpointError(
            f"{path} has unknown keys {', '.join(where + k for k in unknown)}; known: "
            f"{', '.join(known)}, {PER_REWARD}"
        )
    for key, value in values.items():
        default, rule = known[key]
        if isinstance(default, (bool, str)):
            ok = isinstance(value, type(default))
        elif isinstance(default, int):
            least = 0 if ">= 0" in rule else 1
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
        else:
            ok = _finite_number(value) and (value > 0 if "> 0" in rule else value >= 0)
        if not ok:
            raise CheckpointError(
                f'{path}: "{where}{key}" must be {rule}, got {value!r}; fix or delete it'
            )
    return values | notes


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Checkpoint:
    """A loaded checkpoint folder: the denoiser, its critics and its value critics (each
    by reward spec), and its amortised proposal if it has one."""

    denoiser: Denoiser
    critics: dict[str, nn.Module]
    values: dict[str, nn.Module] = field(default_factory=dict)
    proposal: AmortisedProposal | None = None

    def critics_of(self, kind: str) -> dict[str, nn.Module]:
        """The critics a sampler guides with: ``"value"`` critics or the others."""
        return self.values if kind == "value" else self.critics


def save_checkpoint(
    folder: str | Path,
    denoiser: Denoiser,
    critics: Sequence[nn.Module],
    *,
    space: EmbeddingSpace,
    base_model: str,
) -> None:
    """Save a denoiser and its critics (each critic's ``config.reward`` names its file)."""
    save_model(denoiser, folder, DENOISER_STEM, space=space, base_model=base_model)
    for critic in critics:
        save_model(
            critic,
            folder,
            critic_stem(critic.config.reward, critic.config.kind),
            space=space,
            base_model=base_model,
        )


def load_checkpoint(
    folder: str | Path, space: EmbeddingSpace, *, device: torch.device | str = "cpu"
) -> Checkpoint:
    """Load ``folder``'s denoiser, every ``critic-*`` and ``value-*`` model in it, and its
    ``proposal`` if there is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; pass a folder written by "
            "`fastdia train-denoiser`/`train-critic`, or --random-init to try untrained models"
        )
    denoiser = load_model(folder, DENOISER_STEM, space, device=device)
    found: dict[str, dict[str, nn.Module]] = {CRITIC_PREFIX: {}, VALUE_PREFIX: {}}
    for prefix, models in found.items():
        for meta_path in sorted(folder.glob(f"{prefix}*.json")):
            critic = load_model(folder, meta_path.stem, space, device=device)
            models[critic.config.reward] = critic
    proposal = None
    if (folder / f"{PROPOSAL_STEM}.json").is_file():
        proposal = load_model(folder, PROPOSAL_STEM, space, device=device)
    return Checkpoint(
        denoiser=denoiser,
        critics=found[CRITIC_PREFIX],
        values=found[VALUE_PREFIX],
        proposal=proposal,
    )
