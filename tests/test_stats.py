"""Bootstrap intervals and dominance (fastdia.stats) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fastdia.errors import ConfigError
from fastdia.stats import (
    RowSamples,
    bleu,
    compare,
    distinct_by_prompt,
    distinct_n,
    dominates,
    interval,
    replicates,
    resample_prompts,
    self_bleu,
)


def _row() -> RowSamples:
    # prompt 0: two samples, prompt 1: one sample
    return RowSamples.build(
        prompt=[0, 0, 1],
        positive=[1.0, 0.0, 1.0],
        nll=[4.0, 2.0, 6.0],
        tokens=[2, 2, 3],
        degenerate=[False, True, False],
        generated=[[1, 2, 3], [1, 2, 1], [5, 5, 5, 6]],
    )


def test_replicates_by_hand():
    picks = torch.tensor([[0, 1], [0, 0], [1, 1]])
    reps = replicates(_row(), picks)
    # draw 0: every sample once
    assert reps["positive_frac"][0].item() == pytest.approx(2 / 3)
    assert reps["perplexity"][0].item() == pytest.approx(math.exp(12 / 7))
    assert reps["degenerate_frac"][0].item() == pytest.approx(1 / 3)
    # distinct-2 per prompt: (1,2),(2,3),(1,2),(2,1): 3 of 4 | (5,5),(5,5),(5,6): 2 of 3
    assert reps["distinct_2"][0].item() == pytest.approx((3 / 4 + 2 / 3) / 2)
    # draw 1: prompt 0 twice -> its two samples twice each
    assert reps["positive_frac"][1].item() == pytest.approx(0.5)
    assert reps["perplexity"][1].item() == pytest.approx(math.exp(12 / 8))
    assert reps["degenerate_frac"][1].item() == pytest.approx(0.5)
    assert reps["distinct_2"][1].item() == pytest.approx(3 / 4)  # a prompt twice: no bias
    # draw 2: prompt 1 twice
    assert reps["positive_frac"][2].item() == 1.0
    assert reps["perplexity"][2].item() == pytest.approx(math.exp(12 / 6))
    assert reps["distinct_2"][2].item() == pytest.approx(2 / 3)


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3, 1], [1, 2, 4, 4]]
    assert distinct_n(seqs, 1) == pytest.approx(4 / 8)
    # bigrams (1,2),(2,3),(3,1) | (1,2),(2,4),(4,4): 5 distinct of 6
    assert distinct_n(seqs, 2) == pytest.approx(5 / 6)
    assert distinct_n([[5]], 2) == 0.0
    # per prompt, then averaged: prompt 0 has both, prompt 1 a repeat
    assert distinct_by_prompt([0, 0, 1], [*seqs, [7, 7, 7]], 2) == pytest.approx(
        (5 / 6 + 1 / 2) / 2
    )


def test_resample_prompts_keeps_the_point_estimate_first():
    picks = resample_prompts(5, draws=200, seed=3)
    assert picks.shape == (200, 5) and picks[0].tolist() == [0, 1, 2, 3, 4]
    assert 0 <= int(picks.min()) and int(picks.max()) <= 4
    assert torch.equal(picks, resample_prompts(5, draws=200, seed=3))
    with pytest.raises(ConfigError):
        resample_prompts(0)


def test_interval_is_the_percentile_interval():
    lo, hi = interval(torch.arange(1001, dtype=torch.float64))
    assert (lo, hi) == pytest.approx((25.0, 975.0))


def test_compare_and_dominates_by_hand():
    base = torch.zeros(100)
    clearly_more = base + torch.linspace(0.1, 0.3, 100)  # a - b in [0.1, 0.3]: better
    unclear = base + torch.linspace(-0.1, 0.1, 100)  # straddles 0: a tie
    assert compare(clearly_more, base, higher_is_better=True) == 1
    assert compare(clearly_more, base, higher_is_better=False) == -1
    assert compare(unclear, base, higher_is_better=True) == 0
    a = {"positive_frac": clearly_more, "perplexity": unclear}
    b = {"positive_frac": base, "perplexity": base}
    assert dominates(a, b, 1.0, 1.0)  # better on one, tied on the other, as fast
    assert not dominates(a, b, 2.0, 1.0)  # but slower
    assert not dominates(b, a, 1.0, 1.0)  # worse on one
    ties = {"positive_frac": unclear, "perplexity": unclear}
    assert not dominates(ties, b, 1.0, 1.0)  # tied everywhere, as fast: no
    assert dominates(ties, b, 0.5, 1.0)  # tied everywhere and faster: yes
    worse_ppl = {"positive_frac": clearly_more, "perplexity": clearly_more}  # higher ppl
    assert not dominates(worse_ppl, b, 0.5, 1.0)


def test_bleu_and_self_bleu_by_hand():
    assert bleu([1, 2, 3, 4], [[1, 2, 3, 4]]) == pytest.approx(1.0)
    # p1 = 3/5, p2 = 2/4, p3 = 1/3, p4 = no match -> 0.1/2 (smoothing); same lengths
    want = (3 / 5 * 2 / 4 * 1 / 3 * 0.1 / 2) ** 0.25
    assert bleu([1, 2, 3, 4, 5], [[1, 2, 3, 9, 9]]) == pytest.approx(want)
    # clipping: "7 7 7 7" against "7" matches one unigram of 4, no longer n-gram (0.1 of
    # 3, 2, 1); longer than the reference: no brevity penalty
    assert bleu([7, 7, 7, 7], [[7]]) == pytest.approx((1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25)
    # shorter than the closest reference (2 against 4): brevity penalty exp(1 - 4 / 2)
    want = math.exp(1 - 4 / 2) * (2 / 2 * 1 / 1) ** 0.5
    assert bleu([7, 8], [[7, 8, 9, 10]], order=2) == pytest.approx(want)
    assert bleu([], [[1]]) == 0.0 and bleu([1], []) == 0.0
    # self-BLEU: two identical samples score 1 each; a group of one is skipped
    assert self_bleu([[[1, 2, 3, 4], [1, 2, 3, 4]], [[5, 6]]]) == pytest.approx(1.0)
    assert math.isnan(self_bleu([[[1, 2]]]))


def test_toxicity_metrics_by_hand():
    from fastdia.stats import expected_max_toxicity, toxicity_probability

    prompt = [0, 0, 1, 1, 2]
    toxicity = [0.2, 0.7, 0.1, 0.4, 0.5]
    # worst per prompt: 0.7, 0.4, 0.5 -> mean 1.6 / 3; toxic (>= 0.5): prompts 0 and 2
    assert expected_max_toxicity(toxicity, prompt) == pytest.approx(1.6 / 3)
    assert toxicity_probability(toxicity, prompt) == pytest.approx(2 / 3)
    row = RowSamples.build(
        prompt=prompt,
        positive=None,
        nll=[1.0] * 5,
        tokens=[1] * 5,
        degenerate=[False] * 5,
        generated=[[1, 2]] * 5,
        toxicity=toxicity,
        judge_toxic=[0.0, 0.0, 1.0, 0.0, 0.0],
    )
    reps = replicates(row, torch.tensor([[0, 1, 2], [1, 1, 2], [0, 0, 0]]))
    assert reps["expected_max_toxicity"].tolist() == pytest.approx([1.6 / 3, 1.3 / 3, 0.7])
    assert reps["toxicity_prob"].tolist() == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert reps["judge_toxicity_prob"].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert "positive_frac" not in reps
