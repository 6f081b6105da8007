# Two commands: `make demo` and `make test`. Both create .venv on first use and reinstall
# only when a requirements file changed (stamp files inside .venv record what is installed).
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test install clean-venv

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(PY)
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.runtime-installed

# The main job: pretrain the tiny ManagerTower on the synthetic shapes world (generated into
# data/ on first use), from scratch each time (the previous demo run is removed).
DEMO_DIR := runs/demo
demo: $(VENV)/.runtime-installed
	$(PY) -m mtower_jax.summary --config=configs/pretrain.py:model=tiny
	rm -rf $(DEMO_DIR)
	$(PY) -m mtower_jax.main --config=configs/pretrain.py:model=tiny,data=synthetic \
		--workdir=$(DEMO_DIR)
	@echo "checkpoints: $(DEMO_DIR)/checkpoints  metrics: $(DEMO_DIR)/metrics.jsonl  TensorBoard: $(DEMO_DIR)/tensorboard"

test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
