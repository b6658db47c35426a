#!/usr/bin/env bash
# Run every chapter of the book with the `paper` preset on the real TBX11K, on a runner with a GPU.
#   usage: ci/gpu_book.sh /path/to/TBX11K [OUT]      (OUT defaults to runs/gpu-paper)
# Each chapter is executed by papermill into OUT/notebooks/; results live in OUT/run (report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:?usage: ci/gpu_book.sh /path/to/TBX11K [OUT]}"
out="$(realpath -m "${2:-runs/gpu-paper}")"
make venv
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
.venv/bin/tbkd inspect "$data" --split trainval
mkdir -p "$out/notebooks"
for nb in book/0*.ipynb; do
  name=$(basename "$nb")
  case "$name" in 07_*) continue ;; esac   # the sweep demo runs smoke jobs; launch real sweeps with `tbkd sweep`
  echo "== $name"
  .venv/bin/papermill "$nb" "$out/notebooks/$name" --cwd book \
      -p data_dir "$(realpath "$data")" -p run_dir "$out/run" -p preset paper -p device cuda
done
echo "report: $out/run/report.json"
