# txgateway: `make demo` to try it, `make test` to run the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
BUILT   = $(VENV)/.compiled

.PHONY: demo test install compile system-deps lint bench dev-clean dev-cert

$(STAMP): setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat mode: PEP 660 editable installs hide twisted/plugins from twistd.
	# Installed uncompiled: the `compile` step below builds the hot path in place.
	TXGATEWAY_PURE=1 $(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

# The request's hot path compiled by mypyc next to its sources (setup.py says which modules).
# Any source change rebuilds it: an in-place build would otherwise shadow the edited .py files.
# TXGATEWAY_PURE=1 skips it (and removes an earlier build) to run the code uncompiled.
ifeq ($(TXGATEWAY_PURE),)
$(BUILT): $(STAMP) setup.py $(wildcard txgateway/*.py)
	$(BIN)/python setup.py -q build_ext --inplace >/dev/null || { \
	  echo "make compile: the mypyc build failed (it needs gcc and the Python headers, e.g. python3-dev);" \
	       "TXGATEWAY_PURE=1 make $(MAKECMDGOALS) runs txgateway uncompiled" >&2; exit 1; }
	touch txgateway/*.so $(BUILT)  # setuptools keeps a .so whose generated C did not change
else
.PHONY: $(BUILT)
$(BUILT): $(STAMP)
	rm -f txgateway/*.so txgateway__mypyc*.so $(BUILT)
endif

install: $(BUILT)

compile: $(BUILT)

# Tools the tests drive for real: redis-server, redis-sentinel (failover tests), curl, openssl,
# chromium (renders the admin status page headless), systemd-analyze (verifies systemd/*.{service,socket}),
# wrk (bench only).
system-deps:
	@missing=""; \
	for tool in redis-server:redis-server redis-sentinel:redis-sentinel curl:curl openssl:openssl chromium:chromium \
	            ssh:openssh-client ssh-keyscan:openssh-client systemd-analyze:systemd; do \
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

test: install system-deps
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check txgateway tests
	$(BIN)/mypy txgateway

bench: install
	bash bench/run.sh
