"""How much of a language model a denoiser's prior is, position by position.

For held-out windows (the last 32 tokens of the first 96 held-out samples of a
``make-data --states`` folder, split as training splits it: 5%, seed 0), give the first
``P`` tokens clean (``P`` = 8 and 16), every later position pure noise (``t = 1``, no
self-conditioning), and print the cross-entropy (nats) of the next 8 positions under each
denoiser's token head, beside the base model's own next-token cross-entropy there::

    .venv/bin/python scripts/prior_ce.py --data DATA CHECKPOINT [CHECKPOINT ...]

Writes one JSON object per checkpoint to stdout.
"""

from __future__ import annotations

import argparse
import json

import torch

from fastdia.base_model import load_base_model
from fastdia.data import load_dataset
from fastdia.models.checkpoint import DENOISER_STEM, load_model
from fastdia.train.windows import WindowStates, crop_windows

WINDOW, POSITIONS, WINDOWS = 32, 8, 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a make-data --states folder")
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders (tokens heads)")
    args = parser.parse_args()
    base = load_base_model()
    data = load_dataset(args.data, base, WINDOW, states=True)
    _, hold = data.split(0.05, seed=0)
    ids, offset = crop_windows(None, hold.ids[:WINDOWS], WINDOW, fixed=True)
    states = WindowStates(hold.states[:WINDOWS], offset)
    with torch.no_grad():
        logits = base.model(hold.ids[:WINDOWS]).logits.float()
    start = int(offset[0])
    for folder in args.checkpoints:
        den = load_model(folder, DENOISER_STEM, base.space)
        row: dict[str, object] = {"checkpoint": folder}
        for prefix in (8, 16):
            mask = (torch.arange(WINDOW) < prefix).expand(len(ids), -1)
            z0 = base.space.embed(ids)
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
            z = torch.where(mask[..., None], z0, noise)
            extra = {}
            if den.config.reads_states:
                s, m = states.before(prefix, den.config.prefix_states, "cpu")
                extra = {"states": s, "states_mask": m}
            with torch.no_grad():
                out = den.features(z, torch.ones(len(ids)), clean_mask=mask, **extra).float()
            target = den.token_index(ids)
            ce = torch.nn.functional.cross_entropy(
                out.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100
            ).view(target.shape)
            row[f"denoiser_ce_after_{prefix}"] = [
                round(ce[:, prefix + k][target[:, prefix + k] != -100].mean().item(), 3)
                for k in range(POSITIONS)
            ]
            lm = torch.nn.functional.cross_entropy(
                logits[:, start + prefix - 1 : start + prefix - 1 + POSITIONS].flatten(0, 1),
                hold.ids[:WINDOWS, start + prefix : start + prefix + POSITIONS].flatten(),
                reduction="none",
            ).view(len(ids), POSITIONS)
            row[f"base_model_ce_after_{prefix}"] = [round(x, 3) for x in lm.mean(0).tolist()]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
