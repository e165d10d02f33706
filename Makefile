# The README's two commands:  `make train`  (install, prepare Fashion-MNIST, train)  and  `make test`.
# Every install step lives here: Debian packages when run as root, Python packages in ./.venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_DATA := dataset-fashion-mnist
APT_FFCV := pkg-config libturbojpeg0-dev libopencv-dev
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test install install-dev data

train: $(VENV)/.base        ## prepare Fashion-MNIST if needed and train with the CPU default (ARGS="..." to change)
	$(PY) train.py $(ARGS)

test: $(VENV)/.dev          ## the whole test suite (torch, DALI and FFCV loaders, benchmark harness)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(VENV)/.base
install-dev: $(VENV)/.dev

data: $(VENV)/.base         ## only the data preparation step
	$(PY) -m pipeline.datasets --out data/fashion-mnist

define apt_install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else \
	  for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || { echo "missing Debian package $$p: run 'sudo apt-get install -y $(1)' first"; exit 1; }; done; \
	fi
endef

$(VENV)/.base: setup.py Makefile
	$(call apt_install,$(APT_DATA))
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	# DALI is the default run's loader (train.py --loader auto: the cheapest installed); where its wheel
	# does not exist (not x86-64 Linux), the run falls back to --loader torch and says so.
	$(PIP) install -q -e '.[dali]' || { echo "NVIDIA DALI does not install here: train.py will use --loader torch"; $(PIP) install -q -e .; }
	touch $@

$(VENV)/.dev: $(VENV)/.base setup.py Makefile
	$(call apt_install,$(APT_FFCV))
	$(PIP) install -q -e '.[dev,dali,ffcv]'
	$(PIP) install -q --no-deps foolbox==3.3.4   # only its data/ folder of real photos is read, never imported
	touch $@
