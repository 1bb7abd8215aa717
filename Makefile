# `make test` and `make demo` set up .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test test-faults demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -m "not faults" -n 2 --dist loadfile  # two test files at a time, each with its own Ray

# the fault matrix: driver, actor, node and sweep kills, storage outages, concurrent runs of one run id (each
# test file kills only the processes of its own Ray instance, so two run at a time)
test-faults: $(STAMP)
	$(VENV)/bin/python -m pytest -m faults -n 2 --dist loadfile

demo: $(STAMP)
	$(VENV)/bin/python jobs/certify.py --config jobs/configs/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
