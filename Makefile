# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FORTUNES := /usr/share/games/fortunes/fortunes

.PHONY: demo test docs bench fashion-mnist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,export,docs]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxaccel demo

# Real-data tests need Fashion-MNIST and the fortunes text: install them
# when we are root, else say why those tests will be skipped.
fashion-mnist:
	@missing=""; \
	[ -f $(FMNIST) ] || missing="dataset-fashion-mnist"; \
	[ -f $(FORTUNES) ] || missing="$$missing fortunes"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "make: could not install $$missing; real-data tests will be skipped"; \
	  else \
	    echo "make: $$missing missing and we are not root (sudo apt-get install $$missing); real-data tests will be skipped"; \
	  fi; \
	fi

# Three xdist workers on two cores: many tests are bound by single-threaded
# XLA compiles, and the multi-process tests mostly wait; both overlap with
# the other worker's work. Tests that share a trained model are one xdist group.
test: $(VENV)/.installed-test fashion-mnist
	$(BIN)/python -m pytest -q -rs -n 3 --dist loadgroup --timeout=900 --durations=25 \
	  --doctest-modules --nbmake jaxaccel tests notebooks

# The documentation site, warnings as errors (the test command builds it too).
docs: $(VENV)/.installed-test
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/jaxaccel bench --suite train

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/notebooks
