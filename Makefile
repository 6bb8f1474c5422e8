# make test: build the virtualenvs from nothing, then ruff, mypy --strict and pytest on the
#            newest Python with the newest SQLAlchemy and on Python 3.10 with SQLAlchemy 2.0.
#            PostgreSQL tests run when GREENSCOPE_TEST_PG_URL is set.
# make demo: the demo service under a real gunicorn, with and without greenscope.
# make docs: the documentation site (Sphinx, Furo, MyST) into docs/_build/html; warnings
#            are errors (tests/test_docs.py builds it too).
# make package: build the sdist and wheel, twine check, install the wheel in a clean venv.
# make bench: benchmarks against SQLAlchemy's registries (a table, JSON and an SVG chart).
# make soak: 50,000 requests with faults on PostgreSQL, then an audit (SOAK_ARGS=--quick:
#            the reduced run CI makes; --control: the stock worker, which the audit must
#            fail). DATABASE_URL selects the database.
# make fuzz: the model-based test of registries and cleanup, 500 random runs (CI runs 30
#            with a fixed seed as part of make test).
# make soak-celery: a real `celery worker -P gevent -c 50` under faults, then an audit
#            (SOAK_ARGS=--quick, --control, --broker redis; AMQP_URL, REDIS_URL).
#            make soak SOAK_ARGS=--pgbouncer: the soak through PgBouncer in transaction
#            mode, with a database outage (PAUSE); needs Debian's pgbouncer.
# make soak-fleet: three gunicorn hosts (network namespaces) behind HAProxy, through
#            PgBouncer, a host SIGKILLed and one reloaded (SOAK_ARGS=--quick); needs
#            root, haproxy and pgbouncer.

# `python3.X` if it runs, else pyenv's 3.X if installed, else nothing.
find_python = $(shell \
	(python$(1) -c '' >/dev/null 2>&1 && echo python$(1)) || \
	(p=$$(pyenv prefix $(1) 2>/dev/null) && test -x "$$p/bin/python$(1)" && echo "$$p/bin/python$(1)"))

PYTHON ?= $(or $(call find_python,3.13),python3)
PYTHON_OLDEST ?= $(or $(call find_python,3.10),$(PYTHON))
# With one Python for both venvs, $(VENV_SA20) imports the extension $(VENV) built in the
# tree (the same ABI), so only with two Pythons is the pure-Python fallback tested.
SA20_COMPILED := $(if $(filter $(PYTHON),$(PYTHON_OLDEST)),1,0)
VENV := .venv
VENV_SA20 := .venv-sa20
PIP_FLAGS := --quiet --disable-pip-version-check
VERSIONS := 'import sys, sqlalchemy, gevent, greenscope._hot as h; print("== Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__, "gevent", gevent.__version__, "greenscope._hot", "compiled" if h.compiled else "pure Python")'

.PHONY: test lint pytest pytest-sa20 demo bench bench-e2e-instructions soak soak-celery soak-fleet fuzz package docs clean

test: lint pytest pytest-sa20

# greenscope/_hot.py is compiled into the editable install (setup.py): a change to it
# rebuilds the venv, so the tests never run a stale extension. $(VENV) runs the compiled
# module, $(VENV_SA20) the pure-Python fallback (GREENSCOPE_NO_EXTENSIONS=1);
# tests/test_compiled.py checks which one each has.
$(VENV)/.installed: pyproject.toml setup.py greenscope/_hot.py
	@echo "== building $(VENV): installing greenscope and its test tools (about 40 s, once; again after pyproject.toml, setup.py or greenscope/_hot.py change)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_FLAGS) -e '.[test,docs]'
	touch $@

$(VENV_SA20)/.installed: pyproject.toml setup.py greenscope/_hot.py
	rm -rf $(VENV_SA20)
	$(PYTHON_OLDEST) -m venv $(VENV_SA20)
	GREENSCOPE_NO_EXTENSIONS=1 $(VENV_SA20)/bin/python -m pip install $(PIP_FLAGS) -e '.[test]' 'SQLAlchemy>=2.0,<2.1'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

pytest: $(VENV)/.installed
	$(VENV)/bin/python -c $(VERSIONS)
	GREENSCOPE_EXPECT_COMPILED=1 $(VENV)/bin/python -m pytest

pytest-sa20: $(VENV_SA20)/.installed
	$(VENV_SA20)/bin/python -c $(VERSIONS)
	GREENSCOPE_EXPECT_COMPILED=$(SA20_COMPILED) $(VENV_SA20)/bin/python -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/python deploy/demo.py

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench.py

bench-e2e-instructions: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/e2e_instructions.py

soak: $(VENV)/.installed
	$(VENV)/bin/python deploy/soak.py $(SOAK_ARGS)

fuzz: $(VENV)/.installed
	GREENSCOPE_MODEL_EXAMPLES=$${GREENSCOPE_MODEL_EXAMPLES:-500} GREENSCOPE_MODEL_RANDOM=1 \
		$(VENV)/bin/python -m pytest tests/test_model.py -p no:cacheprovider -q --timeout 3600

soak-celery: $(VENV)/.installed
	$(VENV)/bin/python deploy/soak_celery.py $(SOAK_ARGS)

soak-fleet: $(VENV)/.installed
	$(VENV)/bin/python deploy/soak_fleet.py $(SOAK_ARGS)

docs: $(VENV)/.installed
	$(VENV)/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html

package: $(VENV)/.installed
	$(VENV)/bin/python .ci/check_package.py

clean:
	rm -rf $(VENV) $(VENV_SA20) greenscope/*.so greenscope/*.c build .mypy_cache .ruff_cache .pytest_cache *.egg-info dist docs/_build
