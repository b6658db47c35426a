"""run_pipeline refuses phantoms in the run directory that were generated with other settings."""
from __future__ import annotations

import json

import pytest

from tbkd_lib.errors import ConfigError
from tbkd_lib.pipeline import RunConfig, _check_phantoms


def _truth(tmp_path, n_train=600, n_val=200, seed=0, shortcut=0.0):
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"version": 1, "seed": seed, "shortcut": shortcut, "images": {},
                                "generator": {"n_train": n_train, "n_val": n_val}}))
    return path


def test_matching_phantoms_pass(tmp_path):
    _check_phantoms(_truth(tmp_path), RunConfig())
    _check_phantoms(_truth(tmp_path, 300, 100, 2, 0.9), RunConfig(n_train=300, n_val=100, phantom_seed=2,
                                                                  shortcut=0.9))


@pytest.mark.parametrize("field,value", [("n_train", 300), ("n_val", 50), ("phantom_seed", 1), ("shortcut", 0.9)])
def test_other_phantoms_are_refused_naming_the_file_and_the_field(tmp_path, field, value):
    path = _truth(tmp_path)
    with pytest.raises(ConfigError) as err:
        _check_phantoms(path, RunConfig(**{field: value}))
    assert str(path) in str(err.value) and field in str(err.value) and "delete" in str(err.value)


def test_peak_rss_is_the_runs_own_not_its_parents():
    """ru_maxrss carries a parent's RSS through fork + exec; the report must not (VmHWM does not)."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    ballast = np.ones(150_000_000)  # 1.2 GB, touched
    code = ("import resource; from tbkd_lib.pipeline import _peak_rss_mb; "
            "print(_peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    ours, inherited = map(float, out.stdout.split())
    del ballast
    assert ours < inherited - 500, (ours, inherited)


def test_cue_region_widens_the_tag_box_and_clips_to_the_image():
    from tbkd_lib.pipeline import CUE_MARGIN, cue_region

    assert CUE_MARGIN == 0.05
    assert cue_region([10.0, 20.0, 17.0, 27.0], 160) == [2.0, 12.0, 25.0, 35.0]  # 8 px = 5 % of 160
    assert cue_region([3.0, 2.0, 10.0, 9.0], 160) == [0.0, 0.0, 18.0, 17.0]
    assert cue_region([150.0, 150.0, 158.0, 158.0], 160, margin=0.1) == [134.0, 134.0, 160.0, 160.0]
