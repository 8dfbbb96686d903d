#!/usr/bin/env bash
# An aarch64 Python with TVM's runtime, for running aarch64 artifacts under qemu-user on x86
# (tests/test_tvm.py::test_aarch64_library_runs_under_qemu). Everything comes from the registries:
# Debian's arm64 packages for Python 3.11 and its libraries (extracted, not installed), and the
# aarch64 wheels of the host's apache-tvm / apache-tvm-ffi plus numpy from PyPI (unpacked).
#   bash .ci/aarch64_sysroot.sh [DEST]     (default: $PRESSO_AARCH64_SYSROOT or ~/.cache/presso/aarch64-sysroot)
set -euo pipefail
dest="${1:-${PRESSO_AARCH64_SYSROOT:-$HOME/.cache/presso/aarch64-sysroot}}"
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
stamp="apache-tvm $(version apache-tvm), apache-tvm-ffi $(version apache-tvm-ffi)"
# up to date when built for the host's TVM (the library and its runtime must match)
if [ -x "$dest/root/usr/bin/python3.11" ] && [ "$(cat "$dest/tvm-version" 2>/dev/null)" = "$stamp" ]; then exit 0; fi
command -v qemu-aarch64 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
apt-get update -qq
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/wheels" "$work/root" "$work/site"
(cd "$work/debs" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
  libpython3.11-stdlib:arm64 libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 zlib1g:arm64 libffi8:arm64 \
  libexpat1:arm64 libbz2-1.0:arm64 liblzma5:arm64 libssl3:arm64 libuuid1:arm64 libsqlite3-0:arm64 \
  libtinfo6:arm64 libncursesw6:arm64 libreadline8:arm64 libcrypt1:arm64 libdb5.3:arm64 libgdbm6:arm64 \
  libnsl2:arm64 libtirpc3:arm64)
for d in "$work"/debs/*.deb; do dpkg -x "$d" "$work/root"; done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 -d "$work/wheels" \
  "apache-tvm==$(version apache-tvm)" "apache-tvm-ffi==$(version apache-tvm-ffi)" numpy typing_extensions
for w in "$work"/wheels/*.whl; do python -m zipfile -e "$w" "$work/site"; done
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp" && mkdir "$dest.tmp" && mv "$work/root" "$work/site" "$dest.tmp/"
echo "$stamp" > "$dest.tmp/tvm-version"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "aarch64 sysroot ready: $dest"
