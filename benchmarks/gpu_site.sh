#!/usr/bin/env bash
# One archive of the wheels ../shared/tools/gpu-wheels wrote (.whl/1, .whl/2, ...), laid out
# as `pip install --target` lays them out, compressed with xz: about 46 MiB for the describe
# stack, under the 64 MiB one device call may carry, so a fresh GPU machine installs and
# runs in the same call instead of two calls within its 30 s idle limit.
#   benchmarks/gpu_site.sh [WHEELS_DIR] [ARCHIVE]    (defaults: .whl .whl/one/site.tar.xz)
# On the GPU machine: mkdir -p /tmp/site && tar xJf ARCHIVE -C /tmp/site
set -euo pipefail
src=${1:-.whl}
out=${2:-.whl/one/site.tar.xz}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for wheel in "$src"/[0-9]*/*.whl; do
    python3 -m zipfile -e "$wheel" "$tmp"
done
for tgz in "$src"/[0-9]*/*.tgz; do
    [ -e "$tgz" ] && tar xzf "$tgz" -C "$tmp"
done
if compgen -G "$tmp/*.data" >/dev/null; then  # scripts or headers pip would move: not handled
    echo "gpu_site: a wheel has a .data folder ($(ls -d "$tmp"/*.data)); use pip instead" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
tar cf - -C "$tmp" . | xz -9 -T0 >"$out"
echo "$out: $(du -m "$out" | cut -f1) MiB; carry its folder and run:"
echo "  mkdir -p /tmp/site && tar xJf $out -C /tmp/site; export PYTHONPATH=\$PWD:/tmp/site"
