# Two commands: `make demo` and `make test`. Both create .venv and install the project first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the demo writes its records, W&B runs, fits, plans and report.
DEMO_DIR ?= results
# A torch wheel index, e.g. pytorch.org's CPU or CUDA index (empty: the default index, or a build on local disk).
TORCH_INDEX ?=

.PHONY: demo test test-fast install clean bench screenshot

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build from local disk here; a looser pin resolved first can pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (multiruns, resumes, the verification, the wheel build).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The demo sweep on 2 parallel jobs (1 thread each; weights kept), then fit (held out: the largest size, to measure
# extrapolation), the latency law per serving mode, INT8/INT4 quantization and speculative decoding of the trained
# models, select and verify a shape, plan (choosing the serving mode from those measurements), and report. Every
# stage is a command a user can run alone.
demo: $(STAMP)
	$(BIN)/scaling-train -m sweep=demo hydra/launcher=joblib hydra.launcher.n_jobs=2 results_dir=$(DEMO_DIR)
	$(BIN)/scaling-sweep-status sweep=demo results_dir=$(DEMO_DIR)
	$(BIN)/scaling-fit sweep=demo results_dir=$(DEMO_DIR) out=$(DEMO_DIR)/fit/demo \
		'source.fit_rows="params_non_embedding < 1e5"' 'protocol.ties=[[alpha,beta]]'
	$(BIN)/scaling-latency sweep=demo results_dir=$(DEMO_DIR) constants=$(DEMO_DIR)/fit/demo/fit.json \
		out=$(DEMO_DIR)/latency/demo 'measure.modes=[none,int8,int4]'
	$(BIN)/scaling-quantize sweep=demo results_dir=$(DEMO_DIR)
	$(BIN)/scaling-speculate sweep=demo results_dir=$(DEMO_DIR) 'ks=[1,2,4]' prompts=2
	$(BIN)/scaling-verify results_dir=$(DEMO_DIR) sweep=demo constants=$(DEMO_DIR)/fit/demo/fit.json
	$(BIN)/scaling-plan constants=$(DEMO_DIR)/fit/demo/fit.json objective=cost target.chinchilla_params=1e6 \
		demand.tokens=1e10 out=$(DEMO_DIR)/plan/demo serving.mode=auto serving.measurements=$(DEMO_DIR)/serving/demo
	$(BIN)/scaling-report sweep=demo results_dir=$(DEMO_DIR)
	@echo "The demo's report: $(DEMO_DIR)/report/demo/report.html (open it in a browser; no server needed)"

# A PNG of the demo's report in headless Chromium (Debian's package, installed with apt-get when absent).
screenshot: $(STAMP)
	$(BIN)/python scripts/screenshot_report.py --install $(DEMO_DIR)/report/demo/report.html

bench: $(STAMP)
	$(BIN)/python scripts/bench_train_loop.py

clean:
	rm -rf $(VENV) .cache results multirun outputs
