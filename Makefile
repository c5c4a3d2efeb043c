# SecureLLM — two commands: `make run` (start the stack) and `make test` (everything CI runs).
#
# Builds use CARGO_INCREMENTAL=0 and the tuned dev profile in Cargo.toml (2-core machines).

export CARGO_INCREMENTAL ?= 0
CARGO ?= cargo
DATA_DIR ?= $(or $(SECURELLM_DATA_DIR),$(HOME)/.local/share/securellm)
SCHEDULER_LISTEN ?= 127.0.0.1:50051

.PHONY: run test build release fmt fmt-check clippy unit bench bench-scheduler bench-registry bench-estimate bench-backend bench-gateway bench-swap bench-telemetry pyenv promtool help

help:
	@echo "make run    - build (release) and start the stack: 4 services, OpenAI API on 127.0.0.1:8088"
	@echo "make test   - fmt check, clippy -D warnings, every test (what CI runs)"
	@echo "make bench  - benchmark programs (see BENCHMARKS.md)"

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p vram-scheduler -p registry -p backend-manager -p securellm-gateway -p securellm -p securellm-mcp

# The whole stack as four processes on loopback (see scripts/run-stack.sh).
run: release
	DATA_DIR="$(DATA_DIR)" ./scripts/run-stack.sh

test: fmt-check clippy unit

fmt-check:
	$(CARGO) fmt --all -- --check

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The backend tests run the real llama-server: built once (cached outside the repo) by the script.
# cargo-nextest when present (faster, per-test timeouts from .config/nextest.toml), else cargo test.
unit: pyenv promtool nix postgres neovim chromium kubectl
	@SECURELLM_TEST_PYTHON="$(PYENV)/bin/python"; export SECURELLM_TEST_PYTHON; \
	LLAMA_SERVER="$$(./scripts/install-llama-server.sh | tail -n 1)"; export LLAMA_SERVER; \
	echo "llama-server: $$LLAMA_SERVER"; \
	if command -v cargo-nextest >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast && $(CARGO) test --workspace --doc; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi && "$(PYENV)/bin/python" tests/compose_check.py && "$(PYENV)/bin/python" tests/k8s_check.py && $(MAKE) --no-print-directory compose-test

# Prometheus' own checker (`promtool check metrics|config|rules`, `promtool test rules`), used by the
# telemetry and deploy/ tests: Debian's `prometheus` package, installed here once if missing. The
# tests skip LOUDLY (a warning on stderr) only when it could not be installed.
promtool:
	@command -v promtool >/dev/null 2>&1 || test -x /usr/bin/promtool || \
		sudo -n apt-get install -y --no-install-recommends prometheus 2>/dev/null || \
		apt-get install -y --no-install-recommends prometheus || \
		{ apt-get update -q && apt-get install -y --no-install-recommends prometheus; } || \
		echo "WARNING: promtool (Debian package prometheus) could not be installed: the metrics and deploy/ checks will be SKIPPED" >&2

# docker-compose (README "docker-compose"): the image is built without a registry (a debootstrap
# base made once per machine and cached, plus the release binaries and llama-server built here),
# then `up` and a wait until all four services are healthy; prints the URL and the API key.
.PHONY: compose-up compose-down compose-test
compose-up: release
	BIN="$(CURDIR)/target/release" ./scripts/compose.sh up

compose-down:
	./scripts/compose.sh down

# The stack in real containers with faults (tests/compose_e2e.py), from the dev binaries; part of
# `make test`, skipped LOUDLY only where no Docker engine answers.
compose-test: pyenv
	@LLAMA_SERVER="$$(./scripts/install-llama-server.sh | tail -n 1)"; export LLAMA_SERVER; \
	$(CARGO) build -p vram-scheduler -p registry -p backend-manager -p securellm-gateway -p securellm && \
	"$(PYENV)/bin/python" tests/compose_e2e.py

# A test CA and certificates for mutual TLS on the internal gRPC ([internal_tls], README
# "Internal TLS"): CERTS_DIR (default ./certs, ignored by git), one certificate per NAME=SANs.
CERTS_DIR ?= certs
CERTS ?= local=localhost,127.0.0.1,::1
.PHONY: certs
certs:
	./scripts/certs.sh $(CERTS_DIR) $(CERTS)

# Debian's Nix 2.8 (`nix-instantiate`), for the NixOS module checks (tests/e2e/tests/nixos.rs,
# which evaluate nix/module.nix with ../shared/nix-eval): installed once if missing. The checks
# skip LOUDLY (a warning on stderr) only when it could not be installed.
.PHONY: nix
nix:
	@command -v nix-instantiate >/dev/null 2>&1 || \
		sudo -n apt-get install -y --no-install-recommends nix-bin 2>/dev/null || \
		apt-get install -y --no-install-recommends nix-bin || \
		{ apt-get update -q && apt-get install -y --no-install-recommends nix-bin; } || \
		echo "WARNING: nix-instantiate (Debian package nix-bin) could not be installed: the NixOS module checks will be SKIPPED" >&2

# Debian packages installed once when a check fails: $(call apt-install,CHECK,PACKAGES,WHAT IS SKIPPED).
# The tests that need them skip LOUDLY only when they could not be installed.
apt-install = { $(1); } >/dev/null 2>&1 || \
	sudo -n apt-get install -y --no-install-recommends $(2) 2>/dev/null || \
	apt-get install -y --no-install-recommends $(2) || \
	{ apt-get update -q && apt-get install -y --no-install-recommends $(2); } || \
	echo "WARNING: $(2) (Debian) could not be installed: $(3) will be SKIPPED" >&2

# Debian's Neovim (0.7 on Debian 12), for the Neovim plugin's test (tests/e2e/tests/neovim.rs drives
# integrations/neovim in `nvim --headless`).
.PHONY: neovim
neovim:
	@$(call apt-install,command -v nvim,neovim,the Neovim plugin test)

# Debian's Chromium and its WebDriver, for the dashboard's browser test (tests/e2e/tests/dashboard.rs,
# with selenium from the pyenv).
.PHONY: chromium
chromium:
	@$(call apt-install,command -v chromium && command -v chromedriver,chromium chromium-driver,the dashboard browser test)

# Debian's PostgreSQL server binaries (initdb, pg_ctl), for the throw-away clusters the tests of
# shared state start (shared/testkit/src/postgres.rs): installed once if missing. Those tests skip
# LOUDLY only when it could not be installed.
.PHONY: postgres
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		sudo -n apt-get install -y --no-install-recommends postgresql 2>/dev/null || \
		apt-get install -y --no-install-recommends postgresql || \
		{ apt-get update -q && apt-get install -y --no-install-recommends postgresql; } || \
		echo "WARNING: PostgreSQL (Debian package postgresql) could not be installed: the shared-state tests will be SKIPPED" >&2

# kubectl, for tests/k8s_check.py (renders deploy/k8s with `kubectl kustomize`; the manifests
# render with the kustomize v2.0.3 in Debian 12's kubectl 1.20 and with newer ones): Debian's
# `kubernetes-client`, installed once if no kubectl is on PATH; and the PyPI package
# `kubernetes-validate` in the pyenv (the Kubernetes schemas the rendered objects are checked
# against). The check skips those parts LOUDLY only when they could not be installed.
.PHONY: kubectl
kubectl: pyenv
	@"$(PYENV)/bin/python" -c "import kubernetes_validate" 2>/dev/null || "$(PYENV)/bin/pip" install -q kubernetes-validate || \
		echo "WARNING: kubernetes-validate (PyPI) could not be installed: deploy/k8s will not be checked against the Kubernetes schemas" >&2
	@command -v kubectl >/dev/null 2>&1 || \
		sudo -n apt-get install -y --no-install-recommends kubernetes-client 2>/dev/null || \
		apt-get install -y --no-install-recommends kubernetes-client || \
		{ apt-get update -q && apt-get install -y --no-install-recommends kubernetes-client; } || \
		echo "WARNING: kubectl (Debian package kubernetes-client) could not be installed: the deploy/k8s check will be SKIPPED" >&2

PYENV ?= $(or $(SECURELLM_CACHE_DIR),$(HOME)/.cache/securellm)/pyenv

bench: bench-scheduler bench-registry bench-estimate bench-backend bench-gateway bench-swap bench-telemetry bench-storage bench-placement

bench-scheduler:
	$(CARGO) run --release -p securellm-bench -- scheduler

# Real llama.cpp backend: build (once, cached outside the repo) and print the llama-server path.
.PHONY: llama-server
llama-server:
	./scripts/install-llama-server.sh

# A Python venv outside the repo with the PyPI `openai` package (the gateway tests drive the gateway
# with the official client), `gguf` (the registry benchmark's baseline), `pyyaml` (the
# docker-compose check), `schemathesis` (fuzzes the gateway's OpenAPI document,
# tests/e2e/tests/admin_http.rs) and `selenium` (the dashboard's browser test); those tests skip
# LOUDLY only when they could not be installed.
pyenv:
	@test -x "$(PYENV)/bin/python" || python3 -m venv "$(PYENV)"
	@"$(PYENV)/bin/python" -c "import gguf, openai, yaml" 2>/dev/null || "$(PYENV)/bin/pip" install -q gguf openai pyyaml
	@"$(PYENV)/bin/python" -c "import schemathesis" 2>/dev/null || "$(PYENV)/bin/pip" install -q schemathesis || \
		echo "WARNING: schemathesis (PyPI) could not be installed: the OpenAPI fuzzing test will be SKIPPED" >&2
	@"$(PYENV)/bin/python" -c "import selenium" 2>/dev/null || "$(PYENV)/bin/pip" install -q selenium || \
		echo "WARNING: selenium (PyPI) could not be installed: the dashboard browser test will be SKIPPED" >&2

bench-registry: pyenv
	SECURELLM_BENCH_PYTHON="$(PYENV)/bin/python" $(CARGO) run --release -p securellm-bench -- registry

bench-estimate:
	LLAMA_SERVER="$$(./scripts/install-llama-server.sh | tail -n 1)" $(CARGO) run --release -p securellm-bench -- estimate

bench-backend:
	LLAMA_SERVER="$$(./scripts/install-llama-server.sh | tail -n 1)" $(CARGO) run --release -p securellm-bench -- backend

# nginx is the zero-work reverse proxy the gateway is measured against (Debian's `nginx` package:
# the binary, proxy module included); installed here once if missing.
BENCH_GATEWAY_ARGS ?= --seconds 5
bench-gateway:
	@test -n "$$SECURELLM_BENCH_NGINX" || test -x /usr/sbin/nginx || command -v nginx >/dev/null || \
		sudo -n apt-get install -y --no-install-recommends nginx || apt-get install -y --no-install-recommends nginx
	$(CARGO) build --release -p securellm-gateway
	$(CARGO) run --release -p securellm-bench -- gateway $(BENCH_GATEWAY_ARGS)

bench-swap:
	$(CARGO) build --release -p securellm-gateway
	LLAMA_SERVER="$$(./scripts/install-llama-server.sh | tail -n 1)" $(CARGO) run --release -p securellm-bench -- swap

# What metrics and trace export cost the gateway (bare / metrics / export on, beside nginx).
BENCH_TELEMETRY_ARGS ?= --seconds 3 --rounds 3
bench-telemetry:
	@test -n "$$SECURELLM_BENCH_NGINX" || test -x /usr/sbin/nginx || command -v nginx >/dev/null || \
		sudo -n apt-get install -y --no-install-recommends nginx || apt-get install -y --no-install-recommends nginx
	$(CARGO) build --release -p securellm-gateway
	$(CARGO) run --release -p securellm-bench -- telemetry $(BENCH_TELEMETRY_ARGS)

# Keys and rate limits in PostgreSQL vs in the gateway (BENCHMARKS.md): a throw-away cluster from
# Debian's postgresql (installed by `make postgres` if missing).
.PHONY: bench-storage
# The gateway's placement decision over 16 GPU nodes (in process; issue 17).
bench-placement:
	$(CARGO) run --release -p securellm-bench -- placement

bench-storage: postgres
	$(CARGO) build --release -p securellm-gateway
	$(CARGO) run --release -p securellm-bench -- storage $(BENCH_STORAGE_ARGS)
