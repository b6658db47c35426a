"""``make bench``: tbkd's speed measured side by side with plain PyTorch, pytorch-grad-cam and the
machine's own limit. Run ``python -m benchmarks.run --help``; results go to ``bench/results.json`` and
``bench/results.md``."""
