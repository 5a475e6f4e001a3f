"""Cubic sparsity schedule (Zhu & Gupta 2017) at hand-computed points."""

import pytest

from orchestrator.compress import cubic_sparsity

SCHEDULE = dict(initial=0.0, final=0.8, start_step=100, end_step=200, frequency=25)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (100, 0.0),  # t0: s_i
        (125, 0.8 - 0.8 * 0.75**3),  # 0.4625
        (150, 0.8 - 0.8 * 0.5**3),  # 0.7
        (175, 0.8 - 0.8 * 0.25**3),  # 0.7875
        (200, 0.8),
    ],
)
def test_values_at_update_points(step, expected):
    assert cubic_sparsity(step, **SCHEDULE) == pytest.approx(expected, abs=1e-12)


def test_hand_computed_literals_with_nonzero_initial():
    assert cubic_sparsity(125, **SCHEDULE) == pytest.approx(0.4625)
    # 0.8 + (0.1 - 0.8) * 0.5^3 = 0.7125
    assert cubic_sparsity(150, 0.1, 0.8, 100, 200, 25) == pytest.approx(0.7125)


def test_constant_between_updates():
    assert cubic_sparsity(126, **SCHEDULE) == cubic_sparsity(125, **SCHEDULE)
    assert cubic_sparsity(149, **SCHEDULE) == cubic_sparsity(125, **SCHEDULE)
    assert cubic_sparsity(150, **SCHEDULE) > cubic_sparsity(149, **SCHEDULE)


def test_clamped_outside_window():
    assert cubic_sparsity(0, **SCHEDULE) == 0.0
    assert cubic_sparsity(99, 0.2, 0.8, 100, 200, 25) == 0.2
    assert cubic_sparsity(201, **SCHEDULE) == 0.8
    assert cubic_sparsity(10**6, **SCHEDULE) == 0.8


def test_end_step_off_the_frequency_grid_still_reaches_final():
    assert cubic_sparsity(9, 0.0, 0.5, 0, 10, 4) == pytest.approx(0.5 - 0.5 * 0.2**3)  # held from t=8
    assert cubic_sparsity(10, 0.0, 0.5, 0, 10, 4) == 0.5


def test_monotonic_non_decreasing():
    values = [cubic_sparsity(t, **SCHEDULE) for t in range(0, 260)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert len(set(values)) == 5  # exactly the 5 grid points 100, 125, ..., 200


@pytest.mark.parametrize("bad", [dict(frequency=0), dict(end_step=100), dict(final=1.0)])
def test_rejects_invalid_schedule(bad):
    with pytest.raises(ValueError):
        cubic_sparsity(150, **{**SCHEDULE, **bad})
