# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo tensorboard test lint format bench docs doc-images clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench,docs]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_fit.py
	$(PY) benchmarks/bench_callback.py

# The documentation site, into site/ (ignored); --strict turns every warning (a broken link,
# a missing page, an unresolved API reference) into a failure.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

# Regenerate the pictures in docs/images/ (a few minutes): they are committed.
doc-images: $(VENV)/.installed
	$(PY) scripts/make_doc_images.py

clean:
	rm -rf $(VENV) lightning_logs erf_demo_logs .pytest_cache .mypy_cache site

# The demo's logs in TensorBoard (from the venv: `tensorboard` alone is usually not on PATH).
tensorboard: $(VENV)/.installed
	$(VENV)/bin/tensorboard --logdir erf_demo_logs
