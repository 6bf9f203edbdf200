# Two commands set up everything: `make run` and `make test`.
# Each creates .venv on first use from the pinned requirements files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_FAKE_PORT ?= 8123

.PHONY: run demo test bench bench-quick pyz attack docker-check clean

run: $(VENV)/.runtime
	$(BIN)/python sambaproxy.py

demo: $(VENV)/.runtime
	@bash tests/demo.sh "$(BIN)/python" "$(DEMO_FAKE_PORT)"

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

# The bench also measures the seed stack (FastAPI + Hypercorn), from requirements-bench.txt;
# `make test` never installs it.
bench: $(VENV)/.dev $(VENV)/.bench
	$(BIN)/python tests/bench.py

bench-quick: $(VENV)/.dev $(VENV)/.bench
	$(BIN)/python tests/bench.py --quick

# dist/sambaproxy.pyz: the proxy and its pinned dependencies in one executable file, built from
# the packages installed in .venv (no network); runs on any CPython >= 3.11 (deploy/).
pyz: $(VENV)/.runtime
	$(BIN)/python deploy/build_pyz.py --output dist/sambaproxy.pyz

# Hostile clients (tests/attack.py) against a local proxy and the fake, about a minute;
# prints what each did to the proxy's memory, fds, upstream and /info. Not part of `make test`.
attack: $(VENV)/.dev
	$(BIN)/python tests/attack.py

docker-check:
	../shared/tools/docker/check.sh .

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

$(VENV)/.bench: requirements.txt requirements-bench.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

clean:
	rm -rf $(VENV) dist
