"""scripts/pareto.py: the mixture's specs, a row's point, the table and the plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pareto.py"


@pytest.fixture(scope="module")
def pareto():
    spec = importlib.util.spec_from_file_location("pareto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mixture_spec_of_each_weight(pareto):
    assert pareto.guide(1.0, 0.25) == "sentiment:1"
    assert pareto.guide(0.5, 0.25) == "sentiment:0.5,nontoxic:0.125"
    assert pareto.guide(0.0, 0.25) == "nontoxic:0.25"


def test_a_rows_point_and_the_files(pareto, tmp_path):
    row = {
        "rewards": {
            "sentiment": {"positive_frac": 0.75},
            "nontoxic": {"toxicity_prob": 0.25},
        },
        "ci": {"positive_frac": [0.5, 0.9], "toxicity_prob": [0.1, 0.4]},
        "perplexity": 20.0,
        "distinct_2": 0.9,
        "seconds_per_100_tokens": 7.0,
    }
    p = pareto.point(row)
    assert p["positive"] == 0.75 and p["nontoxic"] == 0.75
    assert p["nontoxic_ci"] == pytest.approx([0.6, 0.9])
    points = [
        {"sampler": "fastdia default", "guide": "sentiment:1", "weight": 1.0} | p,
        {"sampler": "fastdia default", "guide": "nontoxic:0.25", "weight": 0.0} | p,
        {"sampler": "base model (T = 0.8)", "guide": "sentiment:1", "weight": None} | p,
    ]
    table = pareto.markdown(points, "python scripts/pareto.py --out x")
    assert "| fastdia default | sentiment:1 | 75% [50%, 90%] | 75% [60%, 90%] | 20.0 |" in table
    pareto.plot(points, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
