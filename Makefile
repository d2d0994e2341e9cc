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

# torch is pinned to the 2.13.0 CPU wheel first, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[nlp,dev,ray]"
	touch $(STAMP)

demo: setup
	$(BIN)/bitmix compile digits-cnn --target int4int2-npu --method eagl --budget 0.75 --eval --out demo-out

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check bitmix tests benchmarks

bench: setup
	$(BIN)/bitmix bench kernels --json bench-kernels.json
	$(BIN)/bitmix bench model --json bench-model.json

clean:
	rm -rf $(VENV) demo-out
