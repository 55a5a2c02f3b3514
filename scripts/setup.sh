#!/usr/bin/env bash
# Create (or reuse) .venv with kdtune installed in editable mode.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --dev    plus the test tools (pytest, ruff)
# Idempotent: a second run with an unchanged pyproject.toml installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"
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
  exit 0
fi

pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk. An unpinned torch
# (or one pulled in by another package) may download a multi-GB CUDA build instead.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".${extras}"
"$venv/bin/python" -c "import kdtune, torch, torchtune; print('kdtune setup: torch', torch.__version__, '| torchtune', torchtune.__version__)"
echo "$fingerprint" > "$stamp"
