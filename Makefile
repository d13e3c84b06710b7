# The two commands of the README: `make demo` (main job on an embedded default) and `make test`.
# Each creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The shipped model's ONNX twin: `predict`, `serve` and `listen` run it with ONNX Runtime on a
# CPU (no torch import; docs/benchmarks.md). Made from weights/default.pt, never committed.
# A default holding a self-trained detector also gets default.detector.onnx beside it.
ONNX := src/pneumoloc/weights/default.onnx
LINT_PATHS := src tests benchmarks tools

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve,onnx,pretrained,dev,pacs]'
	touch $(STAMP)

# Re-exported when the checkpoint or the code that defines the graph changes.
$(ONNX): $(STAMP) src/pneumoloc/weights/default.pt src/pneumoloc/export.py \
		src/pneumoloc/inference/onnx_backend.py src/pneumoloc/cam/classic.py \
		$(wildcard src/pneumoloc/models/*.py)
	$(BIN)/pneumoloc export default --onnx $(ONNX)

install: $(STAMP) $(ONNX)

demo: $(STAMP) $(ONNX)
	$(BIN)/pneumoloc demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

test: lint $(ONNX)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache $(ONNX) $(ONNX:.onnx=.detector.onnx)
