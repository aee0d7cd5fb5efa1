# txgateway: `make demo` to try it, `make test` to run the whole suite.
# The Pythons txgateway supports (setup.cfg's classifiers): `make test` runs the suite on
# $(PYTHON) and the installed wheel's smoke tests on the others; `make test-all-pythons` runs
# the whole suite on each, compiled and TXGATEWAY_PURE=1.
SUPPORTED = 3.11 3.12 3.13
PYTHON ?= python3

# The interpreter for Python $(1): python$(1) when it runs, else pyenv's (whose shims run only
# the versions pyenv selects).
python_for = $(or $(firstword $(foreach p,python$(1) $(wildcard $(HOME)/.pyenv/versions/$(1).*/bin/python$(1)),\
  $(shell $(p) -c 'import sys; print(sys.executable)' 2>/dev/null))),\
  $(error Python $(1) not found as python$(1) nor under ~/.pyenv/versions: install it, e.g. pyenv install $(1)))
ifneq ($(filter python3.%,$(PYTHON)),)
override PYTHON := $(call python_for,$(PYTHON:python%=%))
endif
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifeq ($(PY_VERSION),)
$(error PYTHON=$(PYTHON) does not run)
endif
# One venv per Python: .venv for the default python3, .venv-3.12 for PYTHON=python3.12.
VENV   ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(PY_VERSION))
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# The in-place build of the hot path is named after this Python's ABI (txgateway/transport/http1.cpython-312-…so),
# so the builds for several Pythons sit side by side; its group module stands for all of them.
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
BUILT   = txgateway__mypyc$(EXT_SUFFIX)
export TXGATEWAY_PURE

.PHONY: demo test test-suite test-wheel test-all-pythons install compile system-deps lint bench cache-tests dev-clean dev-cert

$(STAMP): setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# setuptools: Python 3.12 venvs come without it, and `make compile` runs setup.py.
	$(BIN)/pip install -q --upgrade pip setuptools
	# compat mode: PEP 660 editable installs hide twisted/plugins from twistd.
	# Installed uncompiled: the `compile` step below builds the hot path in place.
	TXGATEWAY_PURE=1 $(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# The request's hot path compiled by mypyc next to its sources (setup.py says which modules).
# Any source change rebuilds it: an in-place build would otherwise shadow the edited .py files.
# TXGATEWAY_PURE=1 skips it (and removes an earlier build) to run the code uncompiled.
ifeq ($(TXGATEWAY_PURE),)
$(BUILT): $(STAMP) setup.py $(shell find txgateway -name '*.py')
	$(BIN)/python setup.py -q build_ext --inplace >/dev/null || { \
	  echo "make compile: the mypyc build failed (it needs gcc and the Python headers, e.g. python3-dev);" \
	       "TXGATEWAY_PURE=1 make $(MAKECMDGOALS) runs txgateway uncompiled" >&2; exit 1; }
	find txgateway -name '*$(EXT_SUFFIX)' -exec touch {} + ; touch $(BUILT)  # setuptools keeps a .so whose generated C did not change
else
.PHONY: $(BUILT)
$(BUILT): $(STAMP)
	find txgateway -name '*$(EXT_SUFFIX)' -delete; rm -f $(BUILT)
endif

install: $(BUILT)

compile: $(BUILT)

# Tools the tests drive for real: redis-server, redis-sentinel (failover tests), curl, openssl,
# chromium (renders the admin status page headless), systemd-analyze (verifies systemd/*.{service,socket}),
# wrk (bench only).
system-deps:
	@missing=""; \
	for tool in redis-server:redis-server redis-sentinel:redis-sentinel curl:curl openssl:openssl chromium:chromium \
	            ssh:openssh-client ssh-keyscan:openssh-client systemd-analyze:systemd node:nodejs npm:npm; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# A self-signed certificate for localhost, to try TLS (see etc/tls-example.yaml).
dev-cert: etc/dev-cert/localhost.pem

etc/dev-cert/localhost.pem:
	mkdir -p etc/dev-cert
	openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=localhost" \
	  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
	  -keyout etc/dev-cert/localhost.key -out etc/dev-cert/localhost.pem 2>/dev/null
	chmod 600 etc/dev-cert/localhost.key
	@echo "etc/dev-cert/localhost.pem and .key (self-signed, 30 days)"

demo: install
	$(BIN)/twistd -n --pidfile= txgateway --demo

# The wheel as users' `pip install .` builds it (in build isolation: only pyproject.toml's build
# requirements), installed with its dependencies in a fresh venv outside the checkout, as the
# README's "Running under systemd" says. The tests run their twistd and txgateway subprocesses
# from it (tests/installed/__init__.py). Built once per Python and mode; again when a packaged
# file changes.
CHECKOUT_ID := $(shell printf '%s' '$(CURDIR)' | cksum | cut -d' ' -f1)
WHEEL_HOME   = $(or $(TMPDIR),/tmp)/txgateway-wheel-$(CHECKOUT_ID)-$(PY_VERSION)$(if $(TXGATEWAY_PURE),-pure)
WHEEL_VENV   = $(WHEEL_HOME)/venv
WHEEL_STAMP  = $(WHEEL_HOME)/.installed
WHEEL_TESTED = TXGATEWAY_TEST_BIN=$(WHEEL_VENV)/bin TXGATEWAY_TEST_WHEEL=$$(echo $(WHEEL_HOME)/dist/txgateway-*.whl)

$(WHEEL_STAMP): setup.py setup.cfg pyproject.toml README.md $(shell find txgateway -name '*.py') $(wildcard twisted/plugins/*.py)
	rm -rf $(WHEEL_HOME)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip wheel -q --no-deps -w $(WHEEL_HOME)/dist .
	$(WHEEL_VENV)/bin/pip install -q $(WHEEL_HOME)/dist/txgateway-*.whl
	$(WHEEL_VENV)/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@

# The whole suite on $(PYTHON), then the wheel's smoke tests on the other supported Pythons
# (this venv drives them: they run everything they test as subprocesses of the wheel's venv).
test: test-suite
	$(foreach v,$(filter-out $(PY_VERSION),$(SUPPORTED)),\
	  $(MAKE) --no-print-directory test-wheel PYTHON=python$(v) VENV=$(VENV) &&) :

test-suite: install system-deps $(WHEEL_STAMP)
	$(WHEEL_TESTED) $(BIN)/python -m pytest -q tests

# The installed wheel's smoke tests alone: make test-wheel PYTHON=python3.13
test-wheel: $(STAMP) $(WHEEL_STAMP)
	$(WHEEL_TESTED) $(BIN)/python -m pytest -q tests/installed

# Every supported Python, compiled and TXGATEWAY_PURE=1; a summary at the end.
test-all-pythons:
	@failed=""; \
	for py in $(SUPPORTED:%=python%); do \
	  for pure in "" 1; do \
	    $(MAKE) --no-print-directory test-suite PYTHON=$$py TXGATEWAY_PURE=$$pure \
	      || failed="$$failed $$py$${pure:+ TXGATEWAY_PURE=1};"; \
	  done; \
	done; \
	if [ -n "$$failed" ]; then echo "test-all-pythons: failed on$$failed" >&2; exit 1; fi; \
	echo "test-all-pythons: passed on $(SUPPORTED), compiled and TXGATEWAY_PURE=1"

lint: install
	$(BIN)/ruff check txgateway tests
	$(BIN)/mypy txgateway

bench: install
	bash bench/run.sh

# The public HTTP cache conformance suite (npm http-cache-tests) against a gateway it starts:
# pass counts by kind beside nginx, Squid, Apache, Varnish... (docs/cache.md).
cache-tests: install system-deps
	bash bench/cache-tests.sh
