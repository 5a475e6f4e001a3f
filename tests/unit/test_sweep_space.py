"""Search spaces as written in YAML: parsed, turned into Ray Tune domains, and decoded back into config values."""

from __future__ import annotations

import pytest

from orchestrator.config.validate import ConfigError
from orchestrator.sweep.space import Dimension, decode, encode_options, parse_space, to_tune


def test_every_distribution_parses_and_describes_itself():
    dims = parse_space(
        {
            "trainer.optimizer.lr": {"loguniform": [1e-4, 1e-2]},
            "recipe.distill.temperature": {"uniform": [1.0, 8.0]},
            "trainer.max_steps": {"int": [50, 200]},
            "model.hidden_sizes": {"choice": [[32], [128, 128]]},
            "trainer.zero_stage": {"grid": [0, 2]},
        }
    )
    assert [d.kind for d in dims] == ["loguniform", "uniform", "int", "choice", "grid"]
    assert dims[0].describe() == "loguniform(0.0001, 0.01)"
    assert dims[3].describe() == "choice([32], [128, 128])"
    assert dims[2].probes() == [50, 200]


def test_tune_domains_sample_inside_their_bounds_and_int_is_inclusive():
    from ray import tune

    dims = parse_space({"a": {"loguniform": [1e-4, 1e-2]}, "b": {"int": [3, 4]}, "c": {"grid": [1, 2]}})
    space = to_tune(dims)
    samples = [space["a"].sample() for _ in range(200)]
    assert all(1e-4 <= s <= 1e-2 for s in samples)
    assert {space["b"].sample() for _ in range(200)} == {3, 4}
    assert space["c"] == tune.grid_search([1, 2])


def test_list_options_travel_as_json_and_come_back_as_lists():
    dim = Dimension("model.hidden_sizes", "choice", ([32], [128, 128]))
    encoded = encode_options(dim.values)
    assert encoded == ["[32]", "[128, 128]"]
    assert decode([dim], {"model.hidden_sizes": "[128, 128]"}) == {"model.hidden_sizes": [128, 128]}
    strings = Dimension("trainer.optimizer.name", "choice", ("adamw", "sgd"))
    assert decode([strings], {"trainer.optimizer.name": "sgd"}) == {"trainer.optimizer.name": "sgd"}


@pytest.mark.parametrize(
    "space, key, expected",
    [
        ({}, "sweep.space", "at least one key"),
        ({"trainer.optimizer.lr": {"choice": []}}, "sweep.space.trainer.optimizer.lr.choice", "at least one value"),
        ({"trainer.optimizer.lr": {"grid": []}}, "sweep.space.trainer.optimizer.lr.grid", "at least one value"),
        ({"trainer.optimizer.lr": {"normal": [0, 1]}}, "sweep.space.trainer.optimizer.lr", "unknown distribution"),
        ({"trainer.optimizer.lr": {"loguniform": [0.0, 1.0]}}, "sweep.space.trainer.optimizer.lr.loguniform", "log scale"),
        ({"trainer.optimizer.lr": {"uniform": [2.0, 1.0]}}, "sweep.space.trainer.optimizer.lr.uniform", "low < high"),
        ({"trainer.optimizer.lr": {"uniform": [1.0]}}, "sweep.space.trainer.optimizer.lr.uniform", "[low, high]"),
        ({"trainer.max_steps": {"int": [1.5, 4]}}, "sweep.space.trainer.max_steps.int", "integer"),
        ({"trainer.optimizer.lr": 0.1}, "sweep.space.trainer.optimizer.lr", "exactly one distribution"),
        ({"trainer.optimizer.lr": {"uniform": [0, 1], "choice": [1]}}, "sweep.space.trainer.optimizer.lr", "exactly one"),
    ],
)
def test_malformed_distributions_name_the_key(space, key, expected):
    with pytest.raises(ConfigError) as error:
        parse_space(space)
    assert error.value.key == key
    assert expected in str(error.value)
