# One set of commands for people, CI and hooks. Only Python 3.11+, git and make are assumed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv install proto proto-check proto-breaking proto-release docs deploy lint fmt typecheck test test-only run bench clean

help:
	@echo "make run         start the whole mesh on embedded PostgreSQL and Redis (Ctrl-C stops it)"
	@echo "make test        lint, type-check, check generated code, and run every test"
	@echo "make proto       regenerate Python code and stubs from protos/"
	@echo "make lint|fmt    ruff, mypy, buf lint / format everything"
	@echo "make docs        regenerate the README's table of error reasons"
	@echo "make deploy      regenerate pyproject's entry points, compose and Kubernetes files from the service list"
	@echo "make bench       run the benchmarks in bench/ and print their figures"

venv: $(STAMP)

# pip's and setuptools' notices go to a log that is shown only when the install fails.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the dependencies into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip \
		&& $(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'; } > $(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; echo "make: installing the dependencies failed (log above)"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(PY) scripts/protogen.py
	$(BIN)/buf format -w

proto-check: $(STAMP)
	$(PY) scripts/protogen.py --check

# The contracts of the last release, as a buf image: a change that would break its clients fails `make lint`.
PROTO_BASELINE := protos/released.json

proto-breaking: $(STAMP)
	@mkdir -p .build
	$(BIN)/buf build --exclude-source-info -o .build/protos.json
	$(BIN)/buf breaking .build/protos.json --against $(PROTO_BASELINE) --exclude-imports \
		|| { echo "the protos break clients of the last release ($(PROTO_BASELINE)): add, never change or remove"; exit 1; }

# At a release: the current contracts become the baseline every later change is checked against.
proto-release: $(STAMP)
	$(BIN)/buf build --exclude-source-info -o $(PROTO_BASELINE)

# The README's table of error reasons, generated from the code.
docs: $(STAMP)
	$(PY) scripts/error_reasons.py

# pyproject's entry points, docker-compose.yml and deploy/k8s/base, from agentvault.common.services.
deploy: $(STAMP)
	$(PY) scripts/deploy_gen.py

lint: $(STAMP)
	$(PY) scripts/protogen.py --check
	$(PY) scripts/error_reasons.py --check
	$(PY) scripts/deploy_gen.py --check
	$(BIN)/buf lint
	$(BIN)/buf format --exit-code -d > /dev/null || { $(BIN)/buf format -d; echo "protos are not buf-formatted: run make fmt"; exit 1; }
	$(MAKE) --no-print-directory proto-breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/buf format -w
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected nothing; that must fail, never pass silently.
test-only: $(STAMP)
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: lint test-only

run: $(STAMP)
	$(BIN)/agentvault-dev run

bench: $(STAMP)
	$(PY) -m bench
	$(PY) -m bench.healthmonitor_bench
	$(PY) -m bench.federation_bench
	$(PY) -m bench.identity_bench
	$(PY) -m bench.policy_bench
	$(PY) -m bench.messaging_bench
	$(PY) -m bench.handoff_bench
	$(PY) -m bench.tools_bench

clean:
	rm -rf .build .pytest_cache .mypy_cache .ruff_cache
