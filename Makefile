# One command each: `make demo` runs the main job, `make test` the test suite.
# Both create .venv when it is missing. TORCH_SPEC picks the torch build: the default is the
# CPU wheel this project's CI machines carry; GPU users see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv test demo bench study zoo clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m medssl.demo

clean:
	rm -rf $(VENV) bundles/*/models bundles/*/eval runs zoo
