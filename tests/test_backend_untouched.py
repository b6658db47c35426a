"""Library code that writes PNGs must not switch the caller's matplotlib backend: a notebook that ran
`tbkd run` (overlays) or `predict` once lost every later inline figure (found in a book build)."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_overlay_writers_leave_the_backend_alone(tmp_path):
    code = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        import torch
        from tbkd_lib.predict import _overlay_png
        _overlay_png(__import__("pathlib").Path(r"{tmp_path}") / "o.png", torch.rand(32, 40),
                     torch.rand(32, 40), torch.tensor([[2.0, 3.0, 10.0, 12.0]]), "t")
        assert matplotlib.get_backend().lower() == "svg", matplotlib.get_backend()
        assert plt.get_fignums() == []
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o.png").stat().st_size > 1000


def test_pipeline_overlays_build_figures_without_pyplot():
    import inspect

    from tbkd_lib import pipeline, predict

    for fn in (pipeline._write_overlays, predict._overlay_png):
        src = inspect.getsource(fn)
        assert "matplotlib.use" not in src and "plt." not in src
