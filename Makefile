# make install | demo | test | ensemble RUNS="runs/a runs/b" | bench | sample | clean (runs/demo, data/sample, cache)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# tcmalloc (apt-get install libtcmalloc-minimal4) is preloaded when installed: it sped up the
# channels-first CPU step 1.25x, and the channels-last one 1.0-1.12x (BENCHMARKS.md). Without it,
# glibc keeps the large blocks it frees, on huge pages, instead of faulting them in every batch:
# inference 1.67x, training 1.08x faster (BENCHMARKS.md, session 21)
# (only from glibc 2.36, where it was measured: older ones cap the mmap threshold at 32 MiB,
# refuse the setting and keep only the trim threshold, which would make things worse)
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
GLIBC_VERSION := $(shell getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc //p')
GLIBC_2_36 := $(shell printf '2.36\n%s\n' '$(GLIBC_VERSION)' | sort -V -C 2>/dev/null && echo yes)
GLIBC_MALLOC := $(if $(GLIBC_2_36),GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296)
RUN := $(strip $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC),$(GLIBC_MALLOC)) $(PY))

RUNS ?=
METHOD ?= soft
SUBMISSION ?= submission.csv
DEMO := runs/demo
MASKBENCH ?= ../shared/maskbench

.PHONY: install demo test ensemble bench sample clean

install: $(VENV)/.installed

# Re-runs only when a requirements file changes. facenet-pytorch (MTCNN face detector, weights in
# the wheel) pins torch<2.3 and numpy<2 but runs with ours, so it goes in without its dependencies.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

sample: install
	$(PY) make_sample_data.py --out data/sample

test: install
	$(RUN) -m pytest -q tests

# Sample data -> two short trainings -> inference for each -> ensemble -> submission.csv
demo: sample
	$(RUN) train.py --data_dir data/sample/train --output_dir $(DEMO)/multi --overwrite --head multi --epochs 6
	$(RUN) train.py --data_dir data/sample/train --output_dir $(DEMO)/single --overwrite --head single --epochs 6
	$(RUN) inference.py --run $(DEMO)/multi --eval_dir data/sample/eval --output_dir $(DEMO)/multi
	$(RUN) inference.py --run $(DEMO)/single --eval_dir data/sample/eval --output_dir $(DEMO)/single
	$(MAKE) --no-print-directory ensemble RUNS="$(DEMO)/multi $(DEMO)/single" SUBMISSION=$(DEMO)/submission.csv
	@for s in multi/submission.csv single/submission.csv submission.csv; do \
	  echo "== $(DEMO)/$$s"; $(PY) score.py --answers data/sample/eval/answers.csv --submission $(DEMO)/$$s; done
	@echo "Demo done: runs in $(DEMO)/multi and $(DEMO)/single, ensemble submission $(DEMO)/submission.csv"

ensemble: install
	@test -n "$(RUNS)" || (echo 'usage: make ensemble RUNS="runs/a runs/b" [METHOD=soft|hard|per_task TASK_MEMBERS="0 1 2"] [SUBMISSION=file]'; exit 2)
	$(PY) ensemble.py --members $(RUNS) --method $(METHOD) --submission $(SUBMISSION) $(if $(TASK_MEMBERS),--task_members $(TASK_MEMBERS))

bench: install
	$(RUN) bench.py --maskbench $(MASKBENCH)

# What make itself made: the demo's runs, the sample data and the caches. Your own runs/ stay.
clean:
	rm -rf runs/demo cache data/sample .pytest_cache
