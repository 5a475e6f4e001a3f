"""`orch sweep resume=NAME` from data only: what an interrupted sweep did, read from MLflow, and what is left to run.

Ray Tune's own restore (`Tuner.restore`) unpickles the experiment's state (tuner.pkl, the searcher's state, the
trials), and a sweep's folder often sits on a shared store that others can write: loading it would run whatever
code a pickle there names. So a resume reads only data:
  * the sweep's identity (sweep_plan.json, checked in `orchestrator.sweep.plan._check_resumable`);
  * the parent MLflow run's children: each trial's id (tag orch.trial_id), its values (the child's params, written
    as plain strings from the trial's config), its metric, its status and Tune outcome (tag orch.trial_state);
  * each interrupted trial's Ray Train run folder, whose checkpoints the trial's own run loads (safetensors,
    `weights_only`), as any `resume=` run does.
A fresh Tuner then runs what is left in a folder of its own (tune-resume-<n>); the earlier folders are not read or
written. Finished trials are given to the searcher as evaluated points (Optuna learns from them), interrupted
trials run first with their own values and keep their trial id (`RESUMED_TRIAL_KEY`), so each continues its own
Ray Train run and reopens its own MLflow child, and only `num_samples` trials run in all.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from orchestrator.sweep.space import Dimension, encode_options
from orchestrator.sweep.trial import RESUMED_TRIAL_KEY, STATE_TAG, TRIAL_TAG

if TYPE_CHECKING:
    from orchestrator.sweep.plan import SweepPlan

ATTEMPT_PREFIX = "tune-resume-"
FINISHED_STATES = ("completed", "early_stopped", "failed")


@dataclass(frozen=True)
class RecordedTrial:
    """One trial of an earlier attempt, as its MLflow child recorded it."""

    trial_id: str
    run_id: str
    status: str  # the child's MLflow status: RUNNING, FINISHED, FAILED, KILLED
    state: Optional[str]  # Tune's outcome (orch.trial_state), set when the driver heard it; None when it did not
    params: dict[str, Any]  # the trial's values, in config form (key -> value)
    value: Optional[float]  # the sweep's metric, its last logged value
    metrics: dict[str, float]
    step: Optional[int] = None  # the training step of that last value

    @property
    def finished(self) -> bool:
        """A trial with an outcome: Tune's (tagged), or its run ended on its own (FINISHED) before Tune heard. Any
        other (still RUNNING, or closed as FAILED/KILLED when its driver died) was interrupted and runs again."""
        return self.state in FINISHED_STATES or self.status == "FINISHED"

    @property
    def outcome(self) -> str:
        return self.state or "completed"


def param_value(dim: Dimension, text: str) -> Any:
    """A trial's value for `dim` back from its MLflow param (`orchestrator.track.mlflow_run.flatten`: str(value),
    JSON for a list). Read as data: matched against the dimension's own options, or parsed as a number."""
    if dim.kind in ("choice", "grid"):
        for option in dim.values:
            if text == (json.dumps(option) if isinstance(option, (list, dict)) else str(option)):
                return option
        raise ValueError(f"{dim.key}={text!r} is none of the options {list(dim.values)}")
    return int(text) if dim.kind == "int" else float(text)


def recorded_trial(run: Any, dimensions: Sequence[Dimension], metric: str, step: Optional[int] = None) -> RecordedTrial:
    """A child run (an MLflow `Run`) as a RecordedTrial; `run.data.params` holds the trial's whole config."""
    params = {dim.key: param_value(dim, run.data.params[dim.key]) for dim in dimensions}
    return RecordedTrial(
        trial_id=run.data.tags[TRIAL_TAG], run_id=run.info.run_id, status=run.info.status,
        state=run.data.tags.get(STATE_TAG), params=params, value=run.data.metrics.get(metric),
        metrics=dict(run.data.metrics), step=step,
    )


def split_trials(trials: Iterable[RecordedTrial]) -> tuple[list[RecordedTrial], list[RecordedTrial]]:
    """(finished, interrupted), each in the order given."""
    trials = list(trials)
    return [t for t in trials if t.finished], [t for t in trials if not t.finished]


def next_attempt(sweep_dir: Path) -> int:
    """1 for the first resume, then 2, ...: one past the highest tune-resume-<n> folder already there."""
    numbers = [int(p.name[len(ATTEMPT_PREFIX):]) for p in sweep_dir.glob(f"{ATTEMPT_PREFIX}*") if p.name[len(ATTEMPT_PREFIX):].isdigit()]
    return max(numbers, default=0) + 1


def attempt_seed(seed: Optional[int], attempt: int) -> Optional[int]:
    """The searcher's seed for a resume: another stream than the first attempt's (the same seed would draw the same
    first values again, repeating finished trials), and the same one when the same resume is repeated."""
    return None if seed is None else (seed * 1_000_003 + attempt) % 2**32


def encoded(dimensions: Sequence[Dimension], params: Mapping[str, Any]) -> dict[str, Any]:
    """Config-form values as Tune's param_space holds them (list options as JSON, `encode_options`)."""
    return {dim.key: encode_options([params[dim.key]])[0] for dim in dimensions}


def evaluated_points(dimensions: Sequence[Dimension], finished: Sequence[RecordedTrial]) -> tuple[list[dict], list[float]]:
    """Finished trials that have a metric, as (points, rewards) for a searcher's warm start. A trial that failed
    before it reported has no value to learn from; it still counts as a trial of the sweep."""
    scored = [t for t in finished if t.value is not None]
    return [encoded(dimensions, t.params) for t in scored], [float(t.value) for t in scored]  # type: ignore[arg-type]


def resumed_points(dimensions: Sequence[Dimension], interrupted: Sequence[RecordedTrial]) -> list[dict[str, Any]]:
    """Interrupted trials as the new attempt's first configs: their own values and their own id."""
    return [{**encoded(dimensions, t.params), RESUMED_TRIAL_KEY: t.trial_id} for t in interrupted]


def unrun_user_points(points: Sequence[Mapping[str, Any]], recorded: Sequence[RecordedTrial]) -> list[dict[str, Any]]:
    """`sweep.points_to_evaluate` that no recorded trial ran yet (they run first, as in the first attempt)."""
    left = Counter(json.dumps(t.params, sort_keys=True, default=str) for t in recorded)
    unrun = []
    for point in points:
        key = json.dumps(dict(point), sort_keys=True, default=str)
        if left[key]:
            left[key] -= 1
        else:
            unrun.append(dict(point))
    return unrun


def remaining_samples(num_samples: int, finished: Sequence[RecordedTrial]) -> int:
    """How many trials the new attempt runs (the interrupted ones among them): the sweep has num_samples in all."""
    return max(num_samples - len(finished), 0)


def remaining_variant_points(
    dimensions: Sequence[Dimension], num_samples: int, recorded: Sequence[RecordedTrial], user_points: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """For random/grid search (Tune's basic variant generator, which has no model to continue): the new trials to
    sample, one preset each. Every grid combination runs num_samples times in a sweep; the combinations recorded
    trials (finished or interrupted) and unrun user points already take are left out. A preset names only the grid
    keys: the generator samples the rest with the attempt's seed."""
    grid = [d for d in dimensions if d.kind == "grid"]
    slots: Counter = Counter()
    for combo in itertools.product(*(encode_options(d.values) for d in grid)):
        slots[combo] += num_samples
    taken = [encoded(grid, t.params) for t in recorded] + [encoded(grid, p) for p in user_points]
    for values in taken:
        slots[tuple(values[d.key] for d in grid)] -= 1
    return [dict(zip((d.key for d in grid), combo)) for combo, count in slots.items() for _ in range(max(count, 0))]


def read_trials(client: Any, experiment_id: str, parent_run_id: str, dimensions: Sequence[Dimension], metric: str) -> list[RecordedTrial]:
    """The sweep's trials from its parent's children in MLflow, oldest first (data only: tags, params, metrics)."""
    from orchestrator.track.mlflow_run import PARENT_TAG

    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000,
        order_by=["attributes.start_time ASC"],
    )
    trials = []
    for run in runs:
        if TRIAL_TAG in run.data.tags:
            history = client.get_metric_history(run.info.run_id, metric)
            trials.append(recorded_trial(run, dimensions, metric, max((m.step for m in history), default=None)))
    return trials


def resume_search(plan: "SweepPlan", recorded: Sequence[RecordedTrial], concurrency: int, attempt: int) -> tuple[Any, int]:
    """(Tune search algorithm, num_samples) for a resume's new attempt, or (None, 0) when no trial is left to run.

    Optuna: warmed with the finished trials (`points_to_evaluate` + `evaluated_rewards`), seeded for this attempt,
    handing out the interrupted trials and unrun user points first. Random/grid: Tune's basic variant generator
    with one preset per trial left (interrupted trials first, then unrun user points, then the rest, sampled with
    this attempt's seed)."""
    finished, interrupted = split_trials(recorded)
    remaining = remaining_samples(plan.num_samples, finished)
    if remaining == 0:
        return None, 0
    seed = attempt_seed(plan.seed, attempt)
    user = unrun_user_points(plan.points_to_evaluate, recorded)
    first = resumed_points(plan.dimensions, interrupted) + [encoded(plan.dimensions, point) for point in user]
    if plan.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        points, rewards = evaluated_points(plan.dimensions, finished)
        searcher = OptunaSearch(seed=seed, points_to_evaluate=points or None, evaluated_rewards=rewards or None)
        return presets_first(searcher, first, plan.metric), remaining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    first += remaining_variant_points(plan.dimensions, plan.num_samples, recorded, user)
    if not first:
        return None, 0
    return BasicVariantGenerator(random_state=seed, points_to_evaluate=first, max_concurrent=concurrency), len(first)


def presets_first(searcher: Any, presets: Sequence[Mapping[str, Any]], metric: str):
    """`searcher` (a Ray Tune `Searcher`, e.g. OptunaSearch) that first hands out `presets` (interrupted trials with
    their own id, unrun user points) and then its own suggestions. A preset's result is given to the searcher as an
    evaluated point, so it learns from every trial of the sweep. Built the way Ray's ConcurrencyLimiter wraps one."""
    from ray.tune.search import Searcher

    class PresetsFirst(Searcher):
        def __init__(self) -> None:
            self.searcher = searcher
            self.presets = [dict(p) for p in presets]
            self.handed_out: dict[str, dict[str, Any]] = {}
            super().__init__(metric=searcher.metric, mode=searcher.mode)

        def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec: Any) -> bool:
            return self.searcher.set_search_properties(metric, mode, config, **spec)

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.searcher.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str) -> Optional[dict]:
            if self.presets:
                self.handed_out[trial_id] = self.presets.pop(0)
                return dict(self.handed_out[trial_id])
            return self.searcher.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self.handed_out:
                self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            preset = self.handed_out.pop(trial_id, None)
            if preset is None:
                self.searcher.on_trial_complete(trial_id, result=result, error=error)
            elif not error and result and result.get(metric) is not None:
                point = {k: v for k, v in preset.items() if k != RESUMED_TRIAL_KEY}
                self.searcher.add_evaluated_point(point, result[metric])

        def get_state(self) -> dict:
            """What Tune writes with its experiment state (which a resume never reads back)."""
            return copy.deepcopy({"presets": self.presets, "handed_out": self.handed_out})

        def set_state(self, state: dict) -> None:
            self.presets, self.handed_out = state["presets"], state["handed_out"]

        def save(self, checkpoint_path: str) -> None:
            self.searcher.save(checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            raise NotImplementedError("a sweep resumes from MLflow and checkpoints, never from a searcher's pickle")

    return PresetsFirst()
