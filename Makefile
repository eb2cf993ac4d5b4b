# Entry points of the project; .ci/run calls the same targets.
.PHONY: all build release run run-cluster reset recipes-test console-screenshot test lint fmt smoke docker-lint deploy-lint compose-test compose-cluster-test load-test bench bench-memory wrk-available up down up-cluster down-cluster logs images clean help

CARGO ?= cargo

all: build

help:
	@echo "make run    - the whole stack on loopback (nginx :8080 -> fanout -> 3 demo backends), Ctrl-C stops it"
	@echo "make run-cluster - the same with three NATS JetStream nodes and three fanout instances (needs nats-server)"
	@echo "make reset  - removes make run's outbox and logs under .run/ (refuses while the stack runs)"
	@echo "make recipes-test - runs the README's operator recipes, as written, against make run on spare ports"
	@echo "make test   - unit, integration, end-to-end and browser tests (installs nginx, chromium when missing and root)"
	@echo "make console-screenshot - the console with a staged outage, as docs/console.png (headless chromium)"
	@echo "make lint   - cargo fmt --check and clippy -D warnings"
	@echo "make smoke  - starts 'make run' in the background, tries the README's curl lines, stops it"
	@echo "make load-test - Locust against the local stack, then checks that every backend converged"
	@echo "make bench  - fanout (embedded and NATS stores) beside nginx's mirror, nginx proxying, a direct backend (BENCH_ARGS=...)"
	@echo "make bench-memory - RSS per pending delivery with a dead backend, the in-flight bound, the drain (MEMORY_ARGS=...)"
	@echo "make docker-lint - validates Dockerfile, compose files, nginx template, Prometheus and Grafana config"
	@echo "make deploy-lint - validates deploy/kubernetes/ without a cluster (schemas, probes, limits, budgets, Secret, NATS values)"
	@echo "make compose-test - docker compose up of the real images, checked end to end, then down -v (starts an engine when needed)"
	@echo "make compose-cluster-test - the same for docker-compose.cluster.yml: 3 NATS nodes, 3 fanout instances, one of each killed"
	@echo "make up / down / logs / images - the Docker stack (needs a Docker engine)"
	@echo "make up-cluster / down-cluster - the scaled-out Docker stack (docker-compose.cluster.yml)"
	@echo "make build / release / clean"

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

run:
	@./scripts/run-local.sh

# Three NATS JetStream nodes, three fanout instances on them, nginx over the three (README "Scaling out").
run-cluster:
	@CLUSTER=1 ./scripts/run-local.sh

reset:
	@./scripts/reset-local.sh

recipes-test:
	./scripts/recipes-test.sh

# The README's picture of the console (docs/console.png): the browser test takes it with its staged outage.
console-screenshot:
	@./scripts/ensure-chromium.sh >/dev/null
	@./scripts/ensure-nats.sh >/dev/null
	CONSOLE_SCREENSHOT=$(CURDIR)/docs/console.png $(CARGO) test -p fanout --test console

# The end-to-end tests need nginx and the demo-backend binary beside fanout's; the console's, chromium.
test:
	@./scripts/ensure-nginx.sh >/dev/null
	@./scripts/ensure-chromium.sh >/dev/null
	@./scripts/ensure-nats.sh >/dev/null
	$(CARGO) build --workspace --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

smoke:
	./scripts/smoke-run.sh

docker-lint:
	./scripts/validate-docker.sh

# deploy/kubernetes/ checked offline: kubernetes-validate (PyPI, in .venv) and scripts/check-deploy.py.
deploy-lint:
	./scripts/validate-deploy.sh

# The Docker path run for real: see scripts/compose-test.sh (WRITES, LOCUST_* and the compose file's variables).
compose-test:
	./scripts/compose-test.sh

# The scaled-out Docker stack run for real: see scripts/compose-cluster-test.sh (needs fanout with --store).
compose-cluster-test:
	./scripts/compose-cluster-test.sh

# USERS, SPAWN_RATE, DURATION, SKIP_SOME_REQUESTS: see scripts/load-test.sh.
load-test:
	./scripts/load-test.sh

# wrk (Debian's) drives the benchmark; installed when missing and root.
wrk-available:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } \
		|| { echo "wrk is missing: sudo apt-get install wrk"; exit 1; }
	@./scripts/ensure-nginx.sh >/dev/null

# The NATS scenarios (on unless BENCH_ARGS has --no-nats) need Debian's nats-server, installed when missing and root.
BENCH_ARGS ?=
bench: wrk-available release
	@case " $(BENCH_ARGS) " in *" --no-nats "*) ;; *) ./scripts/ensure-nats.sh >/dev/null ;; esac
	python3 bench/bench.py $(BENCH_ARGS)

MEMORY_ARGS ?=
bench-memory: release
	python3 bench/memory.py $(MEMORY_ARGS)

# The Docker path (needs a Docker engine with Compose v2). MONITORING=1 adds Prometheus and Grafana.
COMPOSE ?= docker compose
PROFILE_ARGS = $(if $(MONITORING),--profile monitoring,)

up:
	$(COMPOSE) $(PROFILE_ARGS) up -d --build

down:
	$(COMPOSE) --profile monitoring down

logs:
	$(COMPOSE) $(PROFILE_ARGS) logs -f --tail=100

# Three NATS nodes, three fanout instances on the NATS store, nginx over the three (docker-compose.cluster.yml).
up-cluster:
	$(COMPOSE) -f docker-compose.cluster.yml up -d --build --wait

down-cluster:
	$(COMPOSE) -f docker-compose.cluster.yml down

images:
	$(COMPOSE) build

clean:
	$(CARGO) clean
	rm -rf .run
