# txgateway: `make demo` to try it, `make test` to run the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test install system-deps lint bench dev-clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat mode: PEP 660 editable installs hide twisted/plugins from twistd
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

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

demo: install
	$(BIN)/twistd -n --pidfile= txgateway --demo

test: install system-deps
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check txgateway tests
	$(BIN)/mypy txgateway

bench: install
	bash bench/run.sh
