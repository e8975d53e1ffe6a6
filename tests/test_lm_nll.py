"""fastdia.lm_nll.tail_nll against the full logits, with left padding, with and without
``logits_to_keep``."""

import pytest
import torch

from fastdia.lm_nll import tail_nll


def _by_hand(model, ids, keep):
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    L = ids.shape[1]
    return torch.stack(
        [-logp[:, p - 1].gather(-1, ids[:, p, None])[:, 0] for p in range(L - keep, L)], 1
    )


class _NoKeep(torch.nn.Module):
    """The same model behind a forward that does not take ``logits_to_keep``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )


@pytest.mark.parametrize("wrap", [False, True])
def test_tail_nll_is_the_full_logits_nll(tiny_base, wrap):
    model = tiny_base.model
    scorer = _NoKeep(model) if wrap else model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 11), generator=g)
    with torch.no_grad():
        want = _by_hand(model, ids, 5)
    torch.testing.assert_close(tail_nll(scorer, ids, 5), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="keep must be in"):
        tail_nll(scorer, ids, 11)


def test_left_padding_changes_no_real_rows_score(tiny_base):
    model = tiny_base.model
    g = torch.Generator().manual_seed(1)
    short, long = (
        torch.randint(0, 300, (1, 6), generator=g),
        torch.randint(0, 300, (1, 9), generator=g),
    )
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = short[0], 1
    ids[1], mask[1] = long[0], 1
    got = tail_nll(model, ids, 4, mask)
    torch.testing.assert_close(got[0], tail_nll(model, short, 4)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], tail_nll(model, long, 4)[0], rtol=1e-4, atol=1e-4)
