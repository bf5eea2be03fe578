# medistill: two commands for users (demo, test), plus setup and bench.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || (echo "python3.11 not found; set PY=/path/to/python3.11" && exit 1)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/medistill data fetch chest-ct
	$(BIN)/medistill run configs/demo.yaml --out runs/demo

test: $(STAMP)
	# the real-data tests use these example sets (cached: no network the second time)
	$(BIN)/medistill data fetch chest-ct radiographs
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	bash benchmarks/setup_venv.sh
	.venv-bench/bin/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
