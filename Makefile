# The README's commands. Each target makes the virtualenv it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
PORT ?= 8000
MAILSINK_PORT ?= 1025

.PHONY: help run test fuzz mailsink deploy-check bench clean
.DEFAULT_GOAL := help

help:  ## list these targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  make %-14s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements-dev.txt
	touch $@

# config.py checks every setting, gunicorn's too, before gunicorn starts (see its docstring).
run: $(BIN)/.installed  ## serve the API on 127.0.0.1:8000 (another port: PORT=8001; SQLite in data/)
	$(BIN)/python config.py $(BIN)/gunicorn --bind 127.0.0.1:$(PORT) personapi:app

# Tests mostly wait (on gunicorn, SMTP, database servers, deadlines): more processes than
# cores shorten the run; TEST_PROCESSES=0 runs them in this one process.
TEST_PROCESSES ?= 4

test: $(BIN)/.installed  ## the whole test suite (in TEST_PROCESSES processes, default 4)
	$(BIN)/pytest -q -n $(TEST_PROCESSES) tests

$(BIN)/.installed-fuzz: $(BIN)/.installed requirements-fuzz.txt
	$(PIP) -r requirements-fuzz.txt
	touch $@

fuzz: $(BIN)/.installed-fuzz  ## schemathesis against the service's own OpenAPI document
	cd tests && ../$(BIN)/python fuzz.py

mailsink: $(BIN)/.installed  ## print every mail sent to localhost:1025 (another port: MAILSINK_PORT=2525)
	@echo "Mail sink listening on localhost:$(MAILSINK_PORT); each mail is printed here (Ctrl-C stops)."
	@[ "$(MAILSINK_PORT)" = 1025 ] || echo "Start the service with SMTP_PORT=$(MAILSINK_PORT) to send here."
	@$(BIN)/python -m aiosmtpd -n -l localhost:$(MAILSINK_PORT)

$(BIN)/.installed-deploy: $(BIN)/.installed deploy/requirements.txt
	$(PIP) -r deploy/requirements.txt
	touch $@

deploy-check: $(BIN)/.installed-deploy  ## build and run the image, play deploy.yaml (as root)
	PATH="$(CURDIR)/$(BIN):$$PATH" deploy/check.sh

clean:  ## remove what the targets made (virtualenv, local database, caches, bench/work): a fresh clone's tree
	rm -rf $(VENV) data .pytest_cache .hypothesis bench/work
	find . \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +

$(BIN)/.installed-bench: $(BIN)/.installed bench/requirements.txt
	$(PIP) -r bench/requirements.txt
	touch $@

bench: $(BIN)/.installed-bench  ## the service against the ceilings of bench/ceiling.py with wrk; writes bench/RESULTS.md, bench/results.png
	@command -v wrk >/dev/null || apt-get install -y -q wrk || (apt-get update -q && apt-get install -y -q wrk) \
		|| { echo 'bench needs wrk: apt-get install wrk (as root)'; exit 1; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)
