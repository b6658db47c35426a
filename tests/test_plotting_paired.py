"""tbkd_lib.plotting.plot_paired_differences: one row per method, filled only where the CI excludes 0."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from matplotlib.colors import to_rgba  # noqa: E402

from tbkd_lib.plotting import plot_paired_differences  # noqa: E402


def test_paired_differences_rows_and_fill():
    diffs = {"gradcam": {"diff": 0.03, "ci95": [0.01, 0.05]},
             "ig": {"diff": -0.02, "ci95": [-0.06, 0.01]},
             "occlusion": {"diff": None, "ci95": None}}
    ax = plot_paired_differences(diffs)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["gradcam", "ig", "occlusion"]
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(markers) == 2                                    # no dot for a missing difference
    gradcam, ig = markers
    assert gradcam.get_xdata()[0] == 0.03 and to_rgba(gradcam.get_markerfacecolor()) != to_rgba("white")
    assert to_rgba(ig.get_markerfacecolor()) == to_rgba("white")   # the interval straddles 0
