# Two commands: `make run` (the whole studio on this machine) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every dependency is pinned with its hashes in requirements-dev.lock (what `make install` and
# CI install) and requirements.lock (the runtime set the Docker image installs); `make lock`
# refreshes both on purpose. torch is locked apart: the CPU build (requirements-torch-cpu.lock)
# here and in CI; on a GPU machine `make install TORCH_SPEC=torch==2.13.0` takes PyPI's CUDA
# build of the same release.
TORCH_SPEC ?= -r requirements-torch-cpu.lock
PORT ?= 8000
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --no-emit-index-url \
	--no-emit-find-links --unsafe-package torch --constraint requirements-torch-cpu.lock

.PHONY: run dev test test-fast lint format bench install migrate lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-dev.lock requirements-torch-cpu.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-dev.lock
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

# Refresh the locks from pyproject.toml's ranges: a deliberate upgrade, committed on its own.
lock: install
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) -o requirements.lock pyproject.toml
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev -o requirements-dev.lock pyproject.toml

migrate: install
	$(PY) manage.py migrate --noinput

# Embedded Redis when REDIS_URL is unset, one CPU Celery worker, the web server (gunicorn,
# DEBUG off, on 127.0.0.1), the demo project and a tiny local base model. Prints the URL and
# the demo logins on first start.
run: migrate
	$(PY) manage.py studio --port $(PORT)

# The same with runserver and DEBUG on, for development.
dev: migrate
	$(PY) manage.py studio --dev --port $(PORT)

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
