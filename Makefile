# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv and install the kit first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch==2.13.0 first: on the dev/CI machines a CPU wheel of that version is on disk, while any other
# torch request would download a several-GB CUDA build. The kit supports torch >= 2.11 (GPU machine: 2.11.0).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.11,<2.14"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tools.commands.demo

# Two workers, whole files each (module fixtures built once): 333 s instead of 566 s on the 2-core dev machine.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs/demo
