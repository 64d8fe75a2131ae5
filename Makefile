# The README's two commands: `make demo` (the main job on built-in synthetic data) and `make test`.
# Both create .venv when missing and install plfusion with CPU Paddle first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plfusion-installed
DEMO_CONFIG ?= configs/quickstart/geminifusion_mit_b0_synthetic.yaml
DEMO_OUT ?= output/quickstart_geminifusion_mit_b0
PYTEST_ARGS ?=

.PHONY: install install-gpu demo test test-gpu clean

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[cpu,test]'
	@touch $(STAMP)

install: $(STAMP)

# GPU machines: Paddle's GPU build comes from Paddle's own wheel index (README, section GPU) and goes
# into .venv first; this installs plfusion without a CPU Paddle, and `import plfusion` says what is
# missing when that step was skipped.
GPU_STAMP := $(VENV)/.plfusion-installed-gpu
$(GPU_STAMP): setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[gpu,test]'
	$(BIN)/python -c "import plfusion"
	@touch $(GPU_STAMP)

install-gpu: $(GPU_STAMP)

# A second `make demo` resumes the run in $(DEMO_OUT) instead of refusing to overwrite it.
demo: install
	@resume=""; [ -f $(DEMO_OUT)/checkpoints/latest.json ] && resume="--resume auto"; \
	echo "$(BIN)/python tools/train.py -c $(DEMO_CONFIG) --threads 2 $$resume"; \
	$(BIN)/python tools/train.py -c $(DEMO_CONFIG) --threads 2 $$resume

test: install
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# The checks that need a GPU (tests marked gpu), after the environment report; on a machine where
# Paddle cannot use a GPU they are skipped, each with the reason.
test-gpu: install-gpu
	$(BIN)/python -m plfusion.env
	$(BIN)/python -m pytest -q -rs -m gpu tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) output .pytest_cache
