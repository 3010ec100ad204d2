# pellucid — the two commands: `make demo` and `make test` (plus `make bench`).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pellucid-installed
DATA ?= $(if $(PELLUCID_DATA),$(PELLUCID_DATA),../shared/data/tb_cxr)

.PHONY: install demo test bench screenshot clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@# System tools for the browser test and PDF checks (best effort: skipped tests say so when absent).
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium poppler-utils fonts-dejavu-core >/dev/null) || echo "note: chromium/poppler not installed"; fi
	@# Noto fonts: file and class names in Chinese, Japanese, Korean, Hindi, Thai... drawn in plots and PDFs, not boxes.
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s fonts-noto-cjk >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    fonts-noto-cjk fonts-noto-core >/dev/null) || echo "note: Noto fonts not installed"; fi
	@# qemu-user emulates an AVX2-only CPU for the INT8 portability test (skipped with a note when absent).
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v qemu-x86_64 >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    qemu-user >/dev/null) || echo "note: qemu-user not installed"; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[all,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	@$(PY) -m pellucid demo --data "$(DATA)" $(if $(NO_UI),--no-ui,)

# One torch thread per test process: the tests are many small models, where threads cost more than
# they give (and the DDP test starts two processes on two cores).
test: $(STAMP)
	@$(PY) -c "from pellucid.core.quantize import cpu_features; print('pellucid CPU:', cpu_features().summary())"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench

# The web app's Predict page in headless Chromium → runs/screenshot.png (generated, never committed).
screenshot: $(STAMP)
	$(PY) -m bench.screenshot --out runs/screenshot.png

clean:
	rm -rf $(VENV) runs .pytest_cache
