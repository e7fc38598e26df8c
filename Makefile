# Two commands: `make demo` and `make test`. Both create .venv and install the project first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the demo writes its records, W&B runs, fits, plans and report.
DEMO_DIR ?= results

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build from local disk here; a looser pin resolved first can pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python scripts/demo.py results.dir=$(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python scripts/bench_train_loop.py

clean:
	rm -rf $(VENV) .cache results multirun outputs
