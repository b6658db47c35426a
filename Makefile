# One command each: `make test`, `make book`. Both create .venv when missing or stale.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
export PYTHONUNBUFFERED := 1

.PHONY: venv test book lab bench run clean-book
venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The main job on the embedded phantom data (reused when finished), then every notebook executed.
book: $(STAMP)
	@start=$$(date +%s); \
	$(PY) -m tbkd_lib run --out runs/main --quiet && \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/jupyter-book build . && \
	echo "Book built in $$(( $$(date +%s) - start )) s. HTML: $(CURDIR)/_build/html/index.html"

# Speed, measured side by side (benchmarks/run.py); benchmark-only packages go in on top of .venv.
BENCH_STAMP := $(VENV)/.bench-stamp
GRAD_CAM    := grad-cam==1.5.5
$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) -m pip install --quiet --no-deps "$(GRAD_CAM)"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run --out bench
	cp bench/results.md benchmarks/results.md
	@echo "Table: $(CURDIR)/bench/results.md (copied to benchmarks/results.md, which the README links)"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab book/

clean-book:
	rm -rf _build
