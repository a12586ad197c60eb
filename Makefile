# One command each: `make train` sets up and trains, `make test` sets up and runs the tests.
# The virtual environment is .venv; it is (re)built when pyproject.toml changes.
PYTHON ?= python3
# The torch release the measurements in RESULTS.md and docs/ used; any release the pyproject range admits works.
# tests/test_wheel.py installs this line's releases beside the wheel in its fresh environment.
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
STAMP := $(VENV)/.installed
# test-lower: every dependency at the lowest release pyproject.toml admits (.ci/lower_bounds.py), torch as above.
LOWER := .venv-lower
LOWER_STAMP := $(LOWER)/.installed
# The releases a red run should name first.
KEY_PACKAGES := '^(torch|torchvision|accelerate|wandb|safetensors|huggingface.hub|rich|pyyaml|matplotlib|numpy|psutil|pytest)=='

ARGS ?=

# The GPU check runs in place with the Python a GPU machine already has (torch, accelerate, ...): no venv.
GPU_PYTHON ?= python3

.PHONY: venv versions train test test-lower test-fast lint slurm-test gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(LOWER_STAMP): pyproject.toml .ci/lower_bounds.py
	rm -rf $(LOWER)
	$(PYTHON) -m venv $(LOWER)
	$(LOWER)/bin/python -m pip install -q --upgrade pip
	$(LOWER)/bin/python -m pip install -q $(TORCH)
	$(LOWER)/bin/python .ci/lower_bounds.py > $(LOWER)/constraints.txt
	$(LOWER)/bin/python -m pip install -q -e '.[test]' -c $(LOWER)/constraints.txt
	touch $(LOWER_STAMP)

# The resolved releases of the key packages, so a red run shows what changed.
versions: $(STAMP)
	@$(VENV)/bin/python -m pip freeze | grep -iE $(KEY_PACKAGES)

# One process (one GPU, or the CPU): signals reach it directly, so SIGTERM to make or to it checkpoints.
# make exits 2 whenever vae-train fails or stops; vae-train's own code is in make's "Error N" line.
# All GPUs of a machine: launch/single_box.sh.
train: $(STAMP)
	$(VENV)/bin/vae-train --config configs/mnist.yaml $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

# The same suite against the lowest releases pyproject.toml admits.
test-lower: $(LOWER_STAMP)
	@$(LOWER)/bin/python -m pip freeze | grep -iE $(KEY_PACKAGES)
	$(LOWER)/bin/python -m pytest -q -p no:cacheprovider $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow and not distributed" $(ARGS)

slurm-test: $(STAMP)
	tests/slurm/cluster.sh install && tests/slurm/cluster.sh up
	$(VENV)/bin/python -m pytest -q -m slurm tests/test_slurm.py; rc=$$?; tests/slurm/cluster.sh down; exit $$rc

gpu-check:
	$(GPU_PYTHON) -m vae_dist.cli.gpu_check $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check vae_dist tests
	$(VENV)/bin/ruff format --check vae_dist tests

clean:
	rm -rf $(VENV) $(LOWER) runs wandb .pytest_cache
