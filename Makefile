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

# libtpu (~200 MB): the TPU compiler tools/aot.py and tests/test_aot.py use on any machine.
$(VENV)/.tpu-installed: requirements-tpu.txt $(VENV)/.runtime-installed
	$(PIP) install -q -r requirements-tpu.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed $(VENV)/.tpu-installed
	$(PIP) install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.runtime-installed

# The main job on the synthetic shapes world (generated into data/ on first use): pretrain the
# tiny ManagerTower, fine-tune VQA from it and from scratch, plot the managers, summarise.
# runs/demo is replaced each time; runs/.xla_cache keeps compiled programs between runs.
DEMO_DIR := runs/demo
demo: $(VENV)/.runtime-installed
	$(PY) -m mtower_jax.summary --config=configs/pretrain.py:model=tiny
	rm -rf $(DEMO_DIR)
	$(PY) -m mtower_jax.tools.demo --workdir=$(DEMO_DIR)

# Two workers, a file each (module fixtures stay shared): XLA's compiles use one core.
test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean-venv:
	rm -rf $(VENV)
