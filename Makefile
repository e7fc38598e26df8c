# Two commands: `make demo` and `make test`. Both create .venv and install the project first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the demo writes its records, W&B runs, fits, plans and report.
DEMO_DIR ?= results
# A torch wheel index, e.g. pytorch.org's CPU or CUDA index (empty: the default index, or a build on local disk).
TORCH_INDEX ?=

.PHONY: demo test test-fast install clean bench findings lr-scan bench-wsd screenshot

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build from local disk here; a looser pin resolved first can pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# every other package at the version the tests passed with (constraints.txt)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# One test worker per core (at most 4), each pinned to its core (tests/conftest.py); a file's tests share a worker.
TEST_WORKERS := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest -q $(TEST_WORKERS)

# Everything but the tests marked slow (multiruns, resumes, the verification, the wheel build).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(TEST_WORKERS) -m "not slow"

# First the isoFLOP study (conf/launch/sweep/demo_isoflop.yaml): 7 shapes x 5 FLOP budgets, 27 cells, each shape one
# WSD stable run with a decay branch per budget; fitted on every budget but the largest, whose compute-optimal size
# and loss it predicts (Approach 2 beside Approach 3). Then the shape study, the demo sweep
# on 2 parallel jobs (1 thread each): 3 size classes x 4 depths x 4 token budgets as WSD decay
# branches (conf/launch/sweep/demo.yaml; the largest class, held out, one layer deeper), plus the smallest shape
# (N 2.5e4, a decade below the largest) and a second seed of one shape of the largest class (weights kept). Then fit
# (held out: the largest size class, to measure extrapolation in N), the latency law per serving mode, INT8/INT4 quantization (of 12 runs) and speculative decoding
# of the trained models, select and verify a shape at the largest size, plan (the isoFLOP study's law, which locates
# the optimum, priced by the shape study's latency law, choosing the serving mode from those measurements), report,
# and print the findings block of the README.
# Every stage is a command a user can run alone. DEMO_DATA runs the same study on another corpus, e.g.
#   make demo DEMO_DATA='data=files data.path=~/corpus' DEMO_DIR=/tmp/mine
DEMO_DATA ?=
empty :=
space := $(empty) $(empty)
comma := ,
DEMO_TRAIN := $(BIN)/scaling-train -m sweep=demo hydra/launcher=joblib results_dir=$(DEMO_DIR) $(DEMO_DATA)
# the isoFLOP study's fit rows: every budget but the largest (2e12 FLOPs), held out
DEMO_ISOFLOP_ROWS := flops_budget < 1.5e12
# the plan on the frontier the study found: a model as good as the compute-optimal one of 2e4 parameters (inside the
# study's sizes), served for 1e10 tokens
DEMO_ISOFLOP_TARGET := 2e4
# the held-out size class: deeper by one step than the fitted classes, so its aspect ratios (27 to 6) lie inside the
# fitted ones (40 to 5.3) and the held-out test extrapolates in N, not in R
DEMO_HELDOUT := model.params=2.4e5 model.n_layers=3,4,6,8
# the fit rows: every size class but the largest (actual N 2.2e5-2.5e5), which is held out
DEMO_FIT_ROWS := params_non_embedding < 2e5

# the runs quantized (about 20 s each on 1 thread): the smallest shape and the largest size class, at the smallest
# and the largest budget (a decade in N and in D for the penalty law)
DEMO_QUANT_ROWS := (tokens_budget == 51200 or tokens_budget == 512000) and (params_non_embedding < 5e4 or params_non_embedding > 2e5)

# the latency measurements: 6 interleaved rounds of one timed pass each (the law fits each shape's fastest round)
DEMO_LATENCY := measure.rounds=6 measure.repeats=1 measure.warmup=1

# the verification's candidates: shapes within 10% of the largest N (the sweep's size-class tolerance), so that a
# shallower shape than the conventional one lies inside both the band and the fitted aspect ratios
DEMO_VERIFY := params_factor=1.0 band=0.1 tokens_per_param=0.5

demo: $(STAMP)
	@mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/.demo_started
	$(BIN)/scaling-train -m sweep=demo_isoflop hydra/launcher=joblib hydra.launcher.n_jobs=2 results_dir=$(DEMO_DIR) \
		$(DEMO_DATA)
	$(BIN)/scaling-fit sweep=demo_isoflop results_dir=$(DEMO_DIR) out=$(DEMO_DIR)/fit/demo_isoflop \
		source.columns.budget=flops_budget 'source.fit_rows="$(DEMO_ISOFLOP_ROWS)"' isoflop.window=4
	$(BIN)/scaling-plan constants=$(DEMO_DIR)/fit/demo_isoflop/fit.json objective=cost \
		target.chinchilla_params=$(DEMO_ISOFLOP_TARGET) demand.tokens=1e10 out=$(DEMO_DIR)/plan/demo_isoflop
	$(DEMO_TRAIN) hydra.launcher.n_jobs=2
	$(DEMO_TRAIN) hydra.launcher.n_jobs=2 $(DEMO_HELDOUT)
	$(DEMO_TRAIN) hydra.launcher.n_jobs=1 model.params=2.5e4 model.n_layers=2 & \
	$(DEMO_TRAIN) hydra.launcher.n_jobs=1 model.params=2.4e5 model.n_layers=4 train.seed=1; wait
	$(BIN)/scaling-sweep-status sweep=demo results_dir=$(DEMO_DIR)
	$(BIN)/scaling-fit sweep=demo results_dir=$(DEMO_DIR) out=$(DEMO_DIR)/fit/demo \
		'source.fit_rows="$(DEMO_FIT_ROWS)"' protocol=auto
	$(BIN)/scaling-latency sweep=demo results_dir=$(DEMO_DIR) constants=$(DEMO_DIR)/fit/demo/fit.json \
		out=$(DEMO_DIR)/latency/demo 'measure.modes=[none,int8,int4]' $(DEMO_LATENCY)
	$(BIN)/scaling-quantize sweep=demo results_dir=$(DEMO_DIR) 'rows="$(DEMO_QUANT_ROWS)"'
	$(BIN)/scaling-speculate sweep=demo results_dir=$(DEMO_DIR) 'ks=[1,2,4]' prompts=2
	$(BIN)/scaling-verify results_dir=$(DEMO_DIR) sweep=demo constants=$(DEMO_DIR)/fit/demo/fit.json \
		$(DEMO_VERIFY) 'train_overrides=[$(subst $(space),$(comma),$(foreach o,$(strip $(DEMO_DATA)),"$(o)"))]'
	$(BIN)/scaling-plan constants=$(DEMO_DIR)/fit/demo_isoflop/fit.json latency=$(DEMO_DIR)/fit/demo/fit.json \
		objective=cost target.chinchilla_params=1e6 demand.tokens=1e10 out=$(DEMO_DIR)/plan/demo \
		serving.mode=auto serving.measurements=$(DEMO_DIR)/serving/demo
	$(BIN)/scaling-report sweep=demo results_dir=$(DEMO_DIR)
	$(BIN)/scaling-report sweep=demo_isoflop results_dir=$(DEMO_DIR)
	$(BIN)/python scripts/demo_findings.py results_dir=$(DEMO_DIR)
	@echo "The demo's report: $(DEMO_DIR)/report/demo/report.html (open it in a browser; no server needed)"
	@echo "make demo's stages took $$(( $$(date +%s) - $$(cat $(DEMO_DIR)/.demo_started) )) s (set-up excluded)"

# The README's "What the demo runs and finds" block, from the demo's outputs (no training).
findings: $(STAMP)
	$(BIN)/python scripts/demo_findings.py results_dir=$(DEMO_DIR)

# The LR scan behind the demo's LR rule: table and figure in $(DEMO_DIR)/lr_scan/ (24 small runs, about 3 min).
lr-scan: $(STAMP)
	$(BIN)/scaling-train -m sweep=lr_scan hydra/launcher=joblib hydra.launcher.n_jobs=2 results_dir=$(DEMO_DIR) \
		$(DEMO_DATA)
	$(BIN)/python scripts/lr_scan_table.py results_dir=$(DEMO_DIR)

# WSD branches against cosine runs of the same points: loss difference per point and compute saved.
bench-wsd: $(STAMP)
	$(BIN)/python scripts/bench_wsd.py results_dir=$(DEMO_DIR) $(DEMO_DATA)

# A PNG of the demo's report in headless Chromium (Debian's package, installed with apt-get when absent).
screenshot: $(STAMP)
	$(BIN)/python scripts/screenshot_report.py --install $(DEMO_DIR)/report/demo/report.html

bench: $(STAMP)
	$(BIN)/python scripts/bench_train_loop.py

clean:
	rm -rf $(VENV) .cache results multirun outputs
