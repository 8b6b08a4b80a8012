#!/usr/bin/env bash
# The part of the describe stack a GPU machine without network lacks (Python 3.12 with its
# own torch, numpy, pillow, tokenizers, accelerate, peft, rich, prometheus-client), as one
# archive laid out as `pip install --target` lays it out: the packages below at the versions
# in this checkout's .venv (so the GPU runs what the tests run), downloaded for CPython 3.12
# manylinux, bitsandbytes with only its CUDA 13 and CPU libraries, compressed with xz. About
# 44 MiB: under the 64 MiB one device call may carry, so a fresh machine installs and
# measures in the same call.
#   benchmarks/gpu_site.sh [ARCHIVE]     (default .whl/one/site.tar.xz; keep it git-ignored)
# On the GPU machine: mkdir -p /tmp/site && tar xJf ARCHIVE -C /tmp/site
#                     export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1
set -euo pipefail
out=${1:-.whl/one/site.tar.xz}
py=.venv/bin/python
[ -x "$py" ] || { echo "gpu_site: no .venv here; run make install first" >&2; exit 2; }
names="transformers av xgrammar apache-tvm-ffi pydantic pydantic-core pydantic-settings
python-dotenv annotated-types typing-inspection pebble click celery kombu billiard vine amqp
redis sqlalchemy alembic mako greenlet tzdata click-didyoumean click-repl click-plugins
prompt-toolkit wcwidth bitsandbytes"
pins=()
for name in $names; do
    version=$("$py" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}' || true)
    [ -n "$version" ] && pins+=("$name==$version")
done
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
    manylinux_2_35_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$tmp/wheels" "${pins[@]}"
mkdir "$tmp/site"
for wheel in "$tmp"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$tmp/site"
done
# bitsandbytes ships a library per CUDA version (43 MB in all); the GPU machine has CUDA 13
find "$tmp/site" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
if compgen -G "$tmp/site/*.data" >/dev/null; then # scripts or headers pip would move
    echo "gpu_site: a wheel has a .data folder ($(ls -d "$tmp"/site/*.data)); not handled" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
tar cf - -C "$tmp/site" . | xz -9 -T0 >"$out"
echo "$out: $(du -m "$out" | cut -f1) MiB (${#pins[@]} packages); carry its folder and run:"
echo "  mkdir -p /tmp/site && tar xJf $out -C /tmp/site; export PYTHONPATH=\$PWD:/tmp/site"
