# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or refreshes, when pyproject.toml changed) the virtual environment in .venv.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.prunecli-dev-installed
JOBS   ?= 2

export PRUNECLI_NO_PROGRESS ?= 1

.PHONY: test demo lint format man man-check bench clean

# --no-cache-dir: torch's CUDA wheels (several GB) would otherwise sit on disk twice, in pip's cache and
# unpacked in .venv; one CI run ran out of disk during this install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	touch $@

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadgroup tests

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

lint: $(STAMP)
	$(PY) -m ruff check src tests tools benchmarks examples
	$(PY) -m ruff format --check src tests tools benchmarks examples

format: $(STAMP)
	$(PY) -m ruff format src tests tools benchmarks examples
	$(PY) -m ruff check --fix src tests tools benchmarks examples

man: $(STAMP)
	SOURCE_DATE_EPOCH=0 $(PY) tools/gen_man.py man

man-check: $(STAMP)
	SOURCE_DATE_EPOCH=0 $(PY) tools/gen_man.py --check man

clean:
	rm -rf $(VENV) demo-out .pytest_cache
