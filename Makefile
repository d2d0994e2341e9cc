# Two commands: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench clean browser

setup: $(STAMP) browser

# Headless Chromium renders report.html in the tests; installed from Debian where we may (root + apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium not installed; the HTML screenshot test will be skipped"; }

# torch is pinned to the 2.13.0 CPU wheel first, so nothing later can pull a CUDA build; everything else comes
# at the exact versions the tests ran with (constraints.txt; pyproject.toml has the ranges).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[nlp,dev,ray]"
	$(BIN)/python -m bitmix.kernels.warmup
	touch $(STAMP)

demo: setup
	$(BIN)/bitmix compile digits-cnn --target int4int2-npu --method eagl --budget 0.75 --eval --out demo-out

# Two pytest workers (pytest-xdist): the suite's compiles and torch code are mostly one-threaded, so two
# processes on two cores took it from ~13 to ~5 minutes; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# ruff, then the import layers and the no-cycles rule of pyproject.toml's [tool.importlinter] (about a second).
lint: setup
	$(BIN)/ruff check bitmix tests benchmarks
	$(BIN)/lint-imports

bench: setup
	$(BIN)/bitmix bench kernels --json bench-kernels.json
	$(BIN)/bitmix bench model --json bench-model.json

clean:
	rm -rf $(VENV) demo-out
