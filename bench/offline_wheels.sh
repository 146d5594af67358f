#!/usr/bin/env bash
# A wheelhouse for running lmforge's GPU tests and bench on an offline CUDA machine whose Python already has
# torch, transformers, tokenizers, numpy, pandas, pyarrow, safetensors, tqdm and psutil (a typical CUDA
# PyTorch image): the rest of what the training path imports, at this venv's versions, for CPython
# $PY_VERSION on x86-64 Linux. MLflow is left out: run with tracking=none.
#
#   bench/offline_wheels.sh [--trim] [DIR]          # here, with network access to a package index
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl   # there
#   export PYTHONPATH=/tmp/site:$PWD; python3 -m pytest -m gpu tests/test_gpu.py
#
# --trim drops the parts of Ray that training never imports (Java jars, RLlib, Serve, Ray LLM and the
# dashboard's web client): 79 MB -> 42 MB, for transfers with a size limit.
set -euo pipefail
trim=0
if [[ "${1:-}" == "--trim" ]]; then trim=1; shift; fi
out=${1:-.whl}
py=${PY_VERSION:-3.12}
venv_python=${VENV_PYTHON:-.venv/bin/python}
mkdir -p "$out"

version() { "$venv_python" -m pip show "$1" | awk '/^Version:/ {print $2}'; }

binary=(ray hjson pydantic pydantic-core annotated-types typing-inspection hydra-core omegaconf jsonschema
        jsonschema-specifications referencing rpds-py colorful dill wcwidth)
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(version "$name")"); done
"$venv_python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" "${specs[@]}"
# Published as sources only; both are pure Python once built (DeepSpeed JIT-builds its ops where they run).
DS_BUILD_OPS=0 "$venv_python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" \
  "deepspeed==$(version deepspeed)" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

if (( trim )); then
  "$venv_python" - "$out" <<'EOF'
import pathlib, sys, zipfile
unused = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
for wheel in pathlib.Path(sys.argv[1]).glob("ray-*.whl"):
    trimmed = wheel.with_suffix(".trim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for item in src.infolist():
            if item.filename.startswith(unused):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):  # pip checks RECORD against the files
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.decode().startswith(unused))
            dst.writestr(item, data)  # keeps each entry's permissions: Ray's binaries stay executable
    trimmed.replace(wheel)
EOF
fi
du -sh "$out"
