# The README's two commands, plus helpers. Both install their own Debian
# dependencies first (scripts/install-deps), then configure and build.
#   make demo   replay Full and StreamingLLM over the bundled sample trace
#   make test   build everything and run the whole test suite
BUILD ?= build
JOBS ?= $(shell nproc)
# CUDA targets are built whenever nvcc exists (no GPU needed to compile).
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CMAKE_FLAGS ?=
ifneq ($(NVCC),)
CMAKE_FLAGS += -DCMAKE_CUDA_COMPILER=$(NVCC)
endif

.PHONY: deps configure build demo test sample clean

deps:
	@scripts/install-deps

configure: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD) -j$(JOBS)

demo: build
	$(BUILD)/cli/kvscope replay --method full,streaming_llm,streaming_llm@kvpress --budget 50%,25%

test: build
	cd $(BUILD) && ctest --output-on-failure -j$(JOBS)

# Regenerates the bundled sample trace (deterministic: same bits every time).
sample: build
# Its settings live in traces/samples/sample.args (a ctest checks the bytes match).
	$(BUILD)/cli/kvscope synth --out traces/samples/sample.h5 $$(cat traces/samples/sample.args)

clean:
	rm -rf $(BUILD)
