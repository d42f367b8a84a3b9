# `make demo` and `make test` each create .venv (Python >= 3.12) on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || "$$(sh scripts/find-python)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flowjax.main --config=experiments/toy2d_reflow.py --workdir=$(WORKDIR)
	@cat $(WORKDIR)/report.md
	@echo; echo "report: $(WORKDIR)/report.md (and report.json), plot: $(WORKDIR)/samples.png"

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) runs
