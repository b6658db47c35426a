"""Multi-process training (DDP, gloo on CPU): 2 ranks via torchrun, rank 0 writes, weights agree."""
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tbkd_lib.io import read_json, read_jsonl

SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    from tbkd_lib.train import TrainConfig, fit

    class Fake(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.arange(n) % 3
            self.images = torch.rand(n, 1, 32, 32, generator=g) * 0.5
            for i, c in enumerate(self.labels.tolist()):
                self.images[i, 0, 8 * c:8 * c + 8, 8:16] += 0.5
        def __len__(self):
            return len(self.labels)
        def __getitem__(self, i):
            return {"image": self.images[i], "label": self.labels[i], "boxes": torch.zeros(0, 4), "index": i}

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    cfg = TrainConfig(arch="resnet18", image_size=32, epochs=2, batch_size=4, lr=3e-3, n_boot=10,
                      progress=False, device="cpu")
    def on_end(model):
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    summary = fit(cfg, {"train": Fake(16, 0), "val": Fake(9, 1)}, os.path.join(out, "run"), _on_end=on_end)
    assert summary["epochs_run"] == 2, summary
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["best_val"]["n"] == 9  # predictions gathered from both ranks, padding dropped
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(w0) == set(w1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [k for k in w0 if not torch.equal(w0[k], w1[k])][:5]
