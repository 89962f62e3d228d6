# The two commands of the README: `make run` and `make test`.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: run test lint typecheck pytest bootstrap migrate bench

bootstrap:
	@scripts/bootstrap.sh

migrate: bootstrap
	@mkdir -p "$${STREAMSVC_VAR_DIR:-var}/static"
	@$(PY) manage.py migrate --noinput -v 0
	@$(PY) manage.py ensure_demo_user

run: migrate
	@$(PY) scripts/run.py

lint: bootstrap
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: bootstrap
	$(PY) -m mypy

pytest: bootstrap
	@scripts/bootstrap.sh --browser
	$(PY) -m pytest

test: lint typecheck pytest

bench: bootstrap
	$(PY) -m bench
