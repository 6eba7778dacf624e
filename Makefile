# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test bench fashion-mnist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxaccel demo

# Real-data tests need Fashion-MNIST: install it when we are root, else say
# why those tests will be skipped.
fashion-mnist:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "make: could not install dataset-fashion-mnist; real-data tests will be skipped"; \
	  else \
	    echo "make: Fashion-MNIST is missing and we are not root (sudo apt-get install dataset-fashion-mnist); real-data tests will be skipped"; \
	  fi; \
	fi

# Two passes on two xdist workers (many tests are bound by single-threaded
# XLA compiles, and the multi-process tests mostly wait). Most tests compile
# many small programs and run them briefly: their pass compiles at XLA
# backend optimization level 0, which halves compile time and changes no
# result a test compares. The real-data runs (marked slow) compute for
# minutes and run at the default level, as users' programs do.
PYTEST := $(BIN)/python -m pytest -q -rs -n 2 --timeout=900 --durations=15

test: $(VENV)/.installed-test fashion-mnist
	XLA_FLAGS="$(XLA_FLAGS) --xla_backend_optimization_level=0" $(PYTEST) \
	  --dist worksteal -m "not slow" --doctest-modules --nbmake jaxaccel tests notebooks
	$(PYTEST) --dist loadgroup -m slow tests

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/jaxaccel bench --suite train

clean:
	rm -rf $(VENV) runs .pytest_cache
