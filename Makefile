# `make demo` and `make test` each create .venv (Python >= 3.12) on first use, with the exact
# versions of requirements/lock.txt; `make lock` refreshes that file against the newest releases.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
WORKDIR ?= runs/demo
# pytest-xdist processes for `make test`, each running one test file at a time (XLA compiles on one core)
TEST_WORKERS ?= 2

.PHONY: demo test venv lock clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	@test -x $(PY) || "$$(sh scripts/find-python)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flowjax.main --config=experiments/toy2d_reflow.py --workdir=$(WORKDIR)
	@cat $(WORKDIR)/report.md
	@echo; echo "report: $(WORKDIR)/report.md (and report.json), plot: $(WORKDIR)/samples.png"

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The newest releases in a fresh temporary venv, the whole suite, and the lock rewritten only if
# it passed (then `make test` reinstalls .venv from it).
lock:
	sh scripts/lock

clean:
	rm -rf $(VENV) runs
