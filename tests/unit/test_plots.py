"""The per-run figures render, and building them leaves nothing behind in pyplot's registry of open figures (a
process running many stages would otherwise keep every one of them)."""

from __future__ import annotations

from pathlib import Path

from matplotlib import pyplot as plt

from orchestrator.track.plots import loss_curve, quality_vs_size


def test_figures_render_to_png_and_none_stays_open(tmp_path: Path):
    before = set(plt.get_fignums())
    history = {"loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "val_loss": [(3, 1.4)], "val_accuracy": [(3, 0.6)]}
    rows = [
        {"stage": "train", "kind": "train", "size_bytes": 40_000, "size_gzip_bytes": 36_000, "val_accuracy": 0.95},
        {"stage": "prune", "kind": "prune", "size_bytes": 40_000, "size_gzip_bytes": 12_000, "val_accuracy": 0.93},
    ]
    for index, figure in enumerate((loss_curve(history, "run"), quality_vs_size(rows, "report"))):
        path = tmp_path / f"{index}.png"
        figure.savefig(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure.axes and all(axis.has_data() for axis in figure.axes)
    assert set(plt.get_fignums()) == before
