# `make test` builds its virtualenvs from nothing, then runs ruff, mypy --strict and pytest
# on the newest SQLAlchemy and on the oldest supported pairing (SQLAlchemy 2.0, Python 3.10
# when the machine has it). PostgreSQL tests run when GREENSCOPE_TEST_PG_URL is set.

PYTHON ?= python3
# The oldest supported Python: python3.10 if it runs, else pyenv's 3.10, else $(PYTHON).
PYTHON_OLDEST ?= $(shell \
	(python3.10 -c '' >/dev/null 2>&1 && echo python3.10) || \
	(p=$$(pyenv prefix 3.10 2>/dev/null) && test -x "$$p/bin/python3.10" && echo "$$p/bin/python3.10") || \
	echo $(PYTHON))
VENV := .venv
VENV_SA20 := .venv-sa20
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: test lint pytest pytest-sa20 clean

test: lint pytest pytest-sa20

$(VENV)/.installed: pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

$(VENV_SA20)/.installed: pyproject.toml
	rm -rf $(VENV_SA20)
	$(PYTHON_OLDEST) -m venv $(VENV_SA20)
	$(VENV_SA20)/bin/python -m pip install $(PIP_FLAGS) -e '.[test]' 'SQLAlchemy>=2.0,<2.1'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

pytest: $(VENV)/.installed
	$(VENV)/bin/python -c 'import sys, sqlalchemy; print("== Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__)'
	$(VENV)/bin/python -m pytest

pytest-sa20: $(VENV_SA20)/.installed
	$(VENV_SA20)/bin/python -c 'import sys, sqlalchemy; print("== Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__)'
	$(VENV_SA20)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(VENV_SA20) .mypy_cache .ruff_cache .pytest_cache *.egg-info
