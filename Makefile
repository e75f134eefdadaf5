# Two commands: `make run` (the whole studio on this machine) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; set TORCH_SPEC='torch' on a GPU machine to take the CUDA build.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000

.PHONY: run test test-fast lint format bench install migrate

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

migrate: install
	$(PY) manage.py migrate --noinput

# Embedded Redis when REDIS_URL is unset, one CPU Celery worker, the web server, the demo
# project and a tiny local base model. Prints the URL and the demo logins on first start.
run: migrate
	$(PY) manage.py studio --port $(PORT)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/engine.py --size tiny
	$(PY) benchmarks/labeling_load.py --labelers 10 --seconds 20
