#!/usr/bin/env bash
# Builds what terraform deploys, with this repository's toolchain, from the repository root:
#
#   terraform/package.sh [--arch arm64|x86_64]
#       every Lambda function in terraform/functions.json, built in release for the
#       architecture (default arm64, terraform's default) and zipped as `bootstrap` into
#       target/lambda/<arch>/<function>.zip, where terraform/functions.tf reads them.
#   terraform/package.sh --runner
#       the gpu-runner image's build context in target/runner-image/: the release kiln-runner
#       (x86_64), the shared libraries it links that the CUDA base image lacks, and the model
#       packages; then: docker build -f gpu-runner/Dockerfile -t <repository>:<tag> target/runner-image
#
# arm64 from an x86_64 machine needs the Rust target and a cross linker:
#   rustup target add aarch64-unknown-linux-gnu && apt-get install gcc-aarch64-linux-gnu
# Lambda's provided.al2023 has glibc 2.34: a binary that asks for a newer glibc symbol is
# refused here rather than failing at its first cold start.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
arch=arm64
runner=false
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:?--arch needs arm64 or x86_64}; shift 2 ;;
    --arch=*) arch=${1#--arch=}; shift ;;
    --runner) runner=true; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

target_dir=${CARGO_TARGET_DIR:-$root/target}
lambda_glibc=2.34

# The newest GLIBC_x.y symbol version a binary needs.
glibc_needed() {
  objdump -T "$1" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1
}

package_functions() {
  local triple
  case "$arch" in
    arm64) triple=aarch64-unknown-linux-gnu ;;
    x86_64) triple=x86_64-unknown-linux-gnu ;;
    *) echo "package.sh: --arch must be arm64 or x86_64, not $arch" >&2; exit 2 ;;
  esac
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
    echo "package.sh: the Rust target $triple is not installed: rustup target add $triple" >&2
    exit 1
  fi
  if [ "$triple" = aarch64-unknown-linux-gnu ] && [ "$(uname -m)" != aarch64 ]; then
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}
    export CC_aarch64_unknown_linux_gnu=${CC_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-gcc}
    if ! command -v "$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER" >/dev/null; then
      echo "package.sh: no cross linker $CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER: apt-get install gcc-aarch64-linux-gnu" >&2
      exit 1
    fi
  fi

  local functions
  functions=$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["functions"]))' terraform/functions.json)
  local bins=()
  for name in $functions; do bins+=(--bin "$name"); done
  echo "package.sh: building ${functions// /, } for $triple (release)"
  cargo build --release --locked --target "$triple" -p kiln-api -p kiln-events "${bins[@]}"

  local out="$target_dir/lambda/$arch"
  mkdir -p "$out"
  for name in $functions; do
    local binary="$target_dir/$triple/release/$name" needed
    needed=$(glibc_needed "$binary")
    if [ -n "$needed" ] && [ "$(printf '%s\n%s\n' "$needed" "$lambda_glibc" | sort -V | tail -1)" != "$lambda_glibc" ]; then
      echo "package.sh: $name needs glibc $needed; Lambda's provided.al2023 has $lambda_glibc" >&2
      exit 1
    fi
    # Fixed timestamps and mode: the same binary makes the same zip, so terraform's
    # source_code_hash changes only when the code does.
    python3 - "$binary" "$out/$name.zip" <<'PY'
import sys, zipfile
binary, zip_path = sys.argv[1], sys.argv[2]
info = zipfile.ZipInfo("bootstrap", date_time=(1980, 1, 1, 0, 0, 0))
info.external_attr = (0o100755 << 16)
info.compress_type = zipfile.ZIP_DEFLATED
with open(binary, "rb") as source, zipfile.ZipFile(zip_path, "w") as archive:
    archive.writestr(info, source.read(), compresslevel=9)
PY
    printf '  %-20s %s (%s bytes, glibc %s)\n' "$name" "${out#"$root"/}/$name.zip" "$(stat -c %s "$out/$name.zip")" "${needed:-none}"
  done
}

package_runner() {
  if [ "$(uname -m)" != x86_64 ]; then
    echo "package.sh: the runner image is x86_64 (CUDA); build it on an x86_64 machine" >&2
    exit 1
  fi
  echo "package.sh: building kiln-runner (release)"
  cargo build --release --locked -p kiln-runner --bin kiln-runner
  local context="$target_dir/runner-image"
  rm -rf "$context"
  mkdir -p "$context/lib"
  cp "$target_dir/release/kiln-runner" "$context/kiln-runner"
  # libvpx (WebM) is linked from the build machine's system; the image carries the same one.
  ldd "$context/kiln-runner" | awk '/libvpx/ { print $3 }' | while read -r lib; do
    cp -L "$lib" "$context/lib/"
  done
  cp -r gpu-runner/models "$context/models"
  echo "package.sh: image context in ${context#"$root"/}:"
  (cd "$context" && find . -maxdepth 2 -type f | sort | sed 's/^/  /')
  echo "then: docker build -f gpu-runner/Dockerfile -t <runner_repository_url>:<tag> ${context#"$root"/}"
}

if $runner; then
  package_runner
else
  package_functions
fi
