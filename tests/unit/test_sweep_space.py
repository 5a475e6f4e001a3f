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


def test_command_line_edits_set_replace_and_remove_one_dotted_key():
    from orchestrator.sweep.space import apply_space_edits, split_space_edits

    space = {"trainer.optimizer.lr": {"loguniform": [1e-4, 3e-2]}, "model.hidden_sizes": {"choice": [[32], [64]]}}
    rest, edits = split_space_edits(
        ["sweep=default", "sweep.num_samples=2", "sweep.space.trainer.optimizer.lr={uniform: [1e-3, 1e-2]}",
         "~sweep.space.model.hidden_sizes", "+sweep.space.model.dropout={choice: [0.0, 0.1]}", "sweep.space.trainer.max_steps=null"]
    )
    assert rest == ["sweep=default", "sweep.num_samples=2"]  # what Hydra still composes
    edited = apply_space_edits(space, edits[:3])
    # replaced, not merged: Hydra's merge would have left loguniform and uniform side by side
    assert edited == {"trainer.optimizer.lr": {"uniform": [1e-3, 1e-2]}, "model.dropout": {"choice": [0.0, 0.1]}}
    assert list(edited) == ["trainer.optimizer.lr", "model.dropout"]
    assert space["model.hidden_sizes"]  # the composed space is not modified in place
    with pytest.raises(ConfigError) as error:
        apply_space_edits(space, edits[3:])  # =null removes too, and trainer.max_steps is not searched
    assert error.value.key == "sweep.space.trainer.max_steps" and "trainer.optimizer.lr, model.hidden_sizes" in str(error.value)


def test_a_null_dimension_is_not_searched_which_lets_hydra_drop_one():
    dims = parse_space({"trainer.optimizer.lr": {"loguniform": [1e-4, 1e-2]}, "model.hidden_sizes": None})
    assert [d.key for d in dims] == ["trainer.optimizer.lr"]


@pytest.mark.parametrize(
    "argument, key, expected",
    [
        ("sweep.space.trainer.optimizer.lr={uniform: [1e-3", "sweep.space.trainer.optimizer.lr", "Hydra's value syntax"),
        ("sweep.space.trainer.optimizer.lr=1e-3,1e-2", "sweep.space.trainer.optimizer.lr", "not a Hydra sweep"),
        ("sweep.space.={uniform: [0, 1]}", "sweep.space", "expected a config key"),
    ],
)
def test_bad_command_line_edits_name_the_key(argument, key, expected):
    from orchestrator.sweep.space import split_space_edits

    with pytest.raises(ConfigError) as error:
        split_space_edits([argument])
    assert error.value.key == key and expected in str(error.value)


def test_changing_a_distribution_through_hydras_merge_points_to_the_replacing_form():
    with pytest.raises(ConfigError) as error:
        parse_space({"trainer.optimizer.lr": {"loguniform": [1e-4, 1e-2], "uniform": [0.1, 0.2]}})
    assert "sweep.space.trainer.optimizer.lr={kind: [...]}" in str(error.value)
