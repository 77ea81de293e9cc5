# The two commands: `make demo` and `make test`. Each sets up .venv on first use.
#
# torch is installed first and pinned, so that nothing else can pull a multi-GB CUDA build.
# To use another torch (a CUDA build, another version), pass e.g.
#   make test TORCH='torch==2.6.0' TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.actscope-installed

.PHONY: demo test setup clean bench chromium

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/actscope profile --metrics all --out runs/demo --overwrite

test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The report's browser tests drive Debian's chromium; install it when none is on PATH (best
# effort: without it those tests skip and say how to install it).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "installing Debian's chromium for the report's browser tests"; \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; } \
	    || echo "could not install chromium; the browser tests will be skipped"; }

setup: $(STAMP)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/profile_overhead.py

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-constraint.txt -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs actscope-runs .pytest_cache
