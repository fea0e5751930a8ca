#!/usr/bin/env bash
# Builds a CUDA-enabled StarPU (libstarpu only) from Debian's `starpu` source package, for CUDA 13.
#
# Steps (each is skipped when its result is already there, so re-running is cheap):
#   1. source:  `apt-get source` with a private apt configuration (deb-src lines in a file of our
#               own, private lists and cache; the system's apt sources are left alone). Tries this
#               machine's Debian release first, then bookworm (1.3.10), and says which it used.
#   2. cuBLAS:  `pip download` of the nvidia-cublas / nvidia-cusparse wheels (CUDA 13 builds, which
#               carry the headers and libraries under nvidia/cu13/), unpacked.
#   3. CUDA dir: one directory with the toolkit's ($CUDA_HOME) and the wheels' include/ and lib64/
#               side by side (symlinks), given to configure as --with-cuda-dir.
#   4. configure (out of tree), 5. make + make install of libstarpu, its headers and .pc files
#               only (the tools are not needed), with scripts/cuda13_compat.h force-included at
#               make time, 6. libhwloc.so.15 (and any other non-base library libstarpu needs) is
#               copied next to libstarpu, 7. checks, then prints the environment to use.
#
#   scripts/build-starpu-cuda.sh [--prefix DIR] [--jobs N]     # long build: consider `nice -n 19`
#
# Environment: CUDA_HOME (default /usr/local/cuda-13.0), PYTHON (python3, for pip), DEBIAN_MIRROR
# (http://deb.debian.org/debian), STARPU_SUITE (Debian suites to try for the source, in order,
# instead of "<this release> bookworm"), CUBLAS_SPEC / CUSPARSE_SPEC (pip requirements of the
# wheels), STARPU_CUDA_WORK (scratch folder: sources, wheels, build tree, logs; default
# <repo>/.starpu-cuda/.work, about 1 GB).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=$REPO/.starpu-cuda
JOBS=$(nproc 2>/dev/null || echo 2)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
PYTHON=${PYTHON:-python3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FALLBACK_SUITE=bookworm
# CUDA 13.0's cuBLAS is 13.0/13.1 and its cuSPARSE 12.6; the GPU machine's runtime libraries are
# CUDA 13.0's, so the headers compiled against should not be newer.
CUBLAS_SPEC=${CUBLAS_SPEC:-nvidia-cublas>=13.0,<13.2}
CUSPARSE_SPEC=${CUSPARSE_SPEC:-nvidia-cusparse>=12.6,<12.7}
COMPAT_HEADER=$REPO/scripts/cuda13_compat.h

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "build-starpu-cuda: ERROR: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --jobs|-j) [ $# -ge 2 ] || die "--jobs needs a number"; JOBS=$2; shift 2 ;;
    --jobs=*) JOBS=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs wants a positive integer, got '$JOBS'"
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
WORK=${STARPU_CUDA_WORK:-$REPO/.starpu-cuda/.work}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
mkdir -p "$WORK"/{stamps,logs}
T0=$(date +%s)

for tool in apt-get dpkg-source gcc make nm pkg-config "$PYTHON"; do
  command -v "$tool" >/dev/null || die "'$tool' not found"
done
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc in $CUDA_HOME/bin (set CUDA_HOME)"
[ -e "$CUDA_HOME/include/cuda.h" ] || die "no $CUDA_HOME/include/cuda.h (set CUDA_HOME)"
[ -f "$COMPAT_HEADER" ] || die "missing $COMPAT_HEADER"
CUDA_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
echo "build-starpu-cuda: prefix $PREFIX, scratch $WORK, $JOBS jobs, CUDA $CUDA_VERSION ($CUDA_HOME)"

# Runs a long command with its output in a log; on failure shows the end of the log.
logged() {
  local log=$1; shift
  echo "   log: $log"
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "'$*' failed (full log: $log)"
  fi
}

# ---------------------------------------------------------------- 1. StarPU source package
SRC_STAMP=$WORK/stamps/source
if [ -f "$SRC_STAMP" ] && [ -x "$(cat "$SRC_STAMP")/configure" ]; then
  SRC=$(cat "$SRC_STAMP")
  step "[1/7] StarPU source: already unpacked in $SRC"
else
  step "[1/7] StarPU source: apt-get source starpu (private apt configuration)"
  APT=$WORK/apt
  rm -rf "$APT" "$WORK/src"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$WORK/src"
  chmod 755 "$WORK" "$APT" "$APT/lists" "$APT/cache"  # apt's download user (_apt) must get in
  OS_ID=$(. /etc/os-release 2>/dev/null; echo "${ID:-}")
  CODENAME=$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")
  if [ -n "${STARPU_SUITE:-}" ]; then
    read -r -a SUITES <<< "$STARPU_SUITE"
  elif [ "$OS_ID" = debian ] && [ -n "$CODENAME" ] && [ "$CODENAME" != "$FALLBACK_SUITE" ]; then
    SUITES=("$CODENAME" "$FALLBACK_SUITE")
  else
    SUITES=("$FALLBACK_SUITE")
  fi
  KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
  SIGNED=""; [ -f "$KEYRING" ] && SIGNED="[signed-by=$KEYRING] "
  : > "$APT/sources.list"
  for s in "${SUITES[@]}"; do echo "deb-src $SIGNED$MIRROR $s main" >> "$APT/sources.list"; done
  APT_OPTS=(
    -o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
    -o "Debug::NoLocking=1" -o "APT::Get::List-Cleanup=0"
  )
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown -R _apt "$APT/lists" "$APT/cache"; fi
  echo "   deb-src suites: ${SUITES[*]} ($MIRROR)"
  logged "$WORK/logs/apt-update.log" apt-get "${APT_OPTS[@]}" update
  USED=""
  for s in "${SUITES[@]}"; do
    DL=$WORK/src/dl-$s
    mkdir -p "$DL"; chmod 777 "$DL"   # apt-get source downloads as _apt when run as root
    echo "   $s: apt-get source --download-only starpu/$s"
    if (cd "$DL" && apt-get "${APT_OPTS[@]}" -q source --download-only "starpu/$s") >"$WORK/logs/apt-source-$s.log" 2>&1; then
      USED=$s; break
    fi
    echo "   $s: download failed, trying the next suite; apt said:"
    grep -m2 '^E: ' "$WORK/logs/apt-source-$s.log" | cut -c1-150 | sed 's/^/     /' || true
  done
  [ -n "$USED" ] || die "could not download the starpu source package from any of: ${SUITES[*]}"
  VERSION=$(sed -n 's/^Version: //p' "$DL"/starpu_*.dsc | head -n 1)
  echo "   $USED: got starpu $VERSION"
  (cd "$WORK/src" && dpkg-source -x "$DL"/starpu_*.dsc >"$WORK/logs/dpkg-source.log" 2>&1) \
    || { tail "$WORK/logs/dpkg-source.log" >&2; die "dpkg-source -x failed"; }
  SRC=$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d -name 'starpu-*' | head -n 1)
  [ -x "$SRC/configure" ] || die "no configure script in $SRC"
  # Debian's patches edit some Makefile.am files; keep automake from trying to regenerate.
  find "$SRC" -name Makefile.in -exec touch {} +
  echo "$USED $VERSION" > "$WORK/source-version"
  echo "$SRC" > "$SRC_STAMP"
fi
read -r SUITE_USED DEB_VERSION < "$WORK/source-version"
echo "   using Debian $SUITE_USED's starpu $DEB_VERSION ($SRC)"

# ---------------------------------------------------------------- 2. cuBLAS / cuSPARSE wheels
WHEELS=$WORK/wheels
if [ -f "$WORK/stamps/wheels" ]; then
  step "[2/7] cuBLAS/cuSPARSE wheels: already unpacked ($(cat "$WORK/stamps/wheels"))"
else
  step "[2/7] cuBLAS/cuSPARSE wheels: pip download '$CUBLAS_SPEC' '$CUSPARSE_SPEC'"
  rm -rf "$WHEELS"; mkdir -p "$WHEELS/unpacked"
  logged "$WORK/logs/pip-download.log" "$PYTHON" -m pip download --disable-pip-version-check \
    --no-deps --only-binary=:all: -d "$WHEELS" "$CUBLAS_SPEC" "$CUSPARSE_SPEC"
  for w in "$WHEELS"/*.whl; do
    echo "   unpacking $(basename "$w")"
    "$PYTHON" -m zipfile -e "$w" "$WHEELS/unpacked"
  done
  (cd "$WHEELS" && ls *.whl | sed 's/-py3-.*//' | tr '\n' ' ' | sed 's/ $//') > "$WORK/stamps/wheels"
  rm -f "$WHEELS"/*.whl   # unpacked; the archives are another ~0.6 GB
fi
WHEEL_INC=$(dirname "$(find "$WHEELS/unpacked" -name cublas_v2.h | head -n 1)")
WHEEL_LIB=$(dirname "$(find "$WHEELS/unpacked" -name 'libcublas.so.*' | head -n 1)")
case $WHEEL_INC in */cu13/*) ;; *) die "the cuBLAS wheel is not a CUDA 13 build (headers in '$WHEEL_INC'); check CUBLAS_SPEC" ;; esac
[ -e "$WHEEL_INC/cusparse.h" ] || die "no cusparse.h in $WHEEL_INC; check CUSPARSE_SPEC"

# ---------------------------------------------------------------- 3. assembled CUDA directory
CUDA=$WORK/cuda
if [ -f "$WORK/stamps/cuda" ]; then
  step "[3/7] CUDA directory: $CUDA (already assembled)"
else
  step "[3/7] CUDA directory: $CUDA = $CUDA_HOME + wheels' include/ and lib/"
  rm -rf "$CUDA"; mkdir -p "$CUDA/include" "$CUDA/lib64"
  for e in "$CUDA_HOME"/*; do
    case $(basename "$e") in include|lib|lib64) ;; *) ln -s "$e" "$CUDA/$(basename "$e")" ;; esac
  done
  ln -s "$CUDA_HOME"/include/* "$CUDA/include/"
  ln -s "$CUDA_HOME"/lib64/* "$CUDA/lib64/"
  for f in "$WHEEL_INC"/* "$WHEEL_LIB"/*; do
    case $f in */include/*) d=include ;; *) d=lib64 ;; esac
    [ -e "$CUDA/$d/$(basename "$f")" ] || ln -s "$f" "$CUDA/$d/"
  done
  for f in "$WHEEL_LIB"/*.so.*; do   # the wheels ship only libX.so.N; -lX needs libX.so
    base=$(basename "$f"); dev=${base%%.so.*}.so
    [ -e "$CUDA/lib64/$dev" ] || ln -s "$base" "$CUDA/lib64/$dev"
  done
  ln -s lib64 "$CUDA/lib"
  touch "$WORK/stamps/cuda"
fi
export LD_LIBRARY_PATH="$CUDA/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # link tests need cublasLt

# ---------------------------------------------------------------- 4. configure
BUILD=$WORK/build
# libstarpu is not linked with cuSPARSE (ac_cv_lib_... =no; its headers are still used): the
# GPU machine's CUDA library folder is only known to hold cudart and cuBLAS, libcusparse would
# also need nvJitLink, and lotus_rt does not use cuSPARSE. nvml.h is not in CUDA_HOME: no NVML.
CONFIGURE_ARGS=(
  --prefix="$PREFIX" --with-cuda-dir="$CUDA" --enable-maxcpus=64 --disable-cuda-memcpy-peer
  --disable-opencl --disable-fortran --disable-mpi --disable-build-examples --disable-build-tests
  --disable-build-doc --disable-socl --disable-starpufft --disable-starpurm --disable-mlr
  --disable-hdf5 --disable-glpk --disable-static --enable-blas-lib=none
  NVCC="$CUDA_HOME/bin/nvcc" LDFLAGS="-Wl,-rpath-link,$CUDA/lib64" ac_cv_lib_cusparse_cusparseCreate=no
)
CONFIGURE_KEY="$SRC ${CONFIGURE_ARGS[*]}"   # a new source or new arguments: configure again
if [ -f "$BUILD/config.status" ] && [ "$(cat "$WORK/stamps/configure" 2>/dev/null)" = "$CONFIGURE_KEY" ]; then
  step "[4/7] configure: already done ($BUILD)"
else
  step "[4/7] configure ($BUILD)"
  echo "   ${CONFIGURE_ARGS[*]}"
  rm -rf "$BUILD" "$WORK/stamps/build"; mkdir -p "$BUILD"
  (cd "$BUILD" && logged "$WORK/logs/configure.log" "$SRC/configure" "${CONFIGURE_ARGS[@]}")
  grep -q '^#define STARPU_USE_CUDA 1' "$BUILD/include/starpu_config.h" \
    || die "configure did not enable CUDA (see $WORK/logs/configure.log and $BUILD/config.log)"
  echo "$CONFIGURE_KEY" > "$WORK/stamps/configure"
fi

# ---------------------------------------------------------------- 5. build + install libstarpu
# configure's CPPFLAGS (it adds -I<cuda>/include) plus the compat header, at make time only.
MAKE_CPPFLAGS=$(sed -n 's/^CPPFLAGS = //p' "$BUILD/Makefile" | tr -s ' ')
case " $MAKE_CPPFLAGS " in *" -I$CUDA/include "*) ;; *) MAKE_CPPFLAGS="$MAKE_CPPFLAGS -I$CUDA/include" ;; esac
MAKE_CPPFLAGS="${MAKE_CPPFLAGS% } -include $COMPAT_HEADER"
if [ -f "$WORK/stamps/build" ]; then
  step "[5/7] build: libstarpu already built and installed in $PREFIX"
else
  step "[5/7] build: make -C src -j$JOBS (libstarpu only; one to a few minutes)"
  echo "   CPPFLAGS=$MAKE_CPPFLAGS"
  T1=$(date +%s)
  logged "$WORK/logs/make.log" make -C "$BUILD/src" -j"$JOBS" CPPFLAGS="$MAKE_CPPFLAGS"
  echo "   built in $(( $(date +%s) - T1 )) s"
  step "[5/7] install into $PREFIX (library, headers, pkg-config files)"
  logged "$WORK/logs/install.log" bash -c '
    make -C "$1/src" install CPPFLAGS="$2" &&
    make -C "$1" install-versincludeHEADERS install-nodist_versincludeHEADERS install-pkgconfigDATA' \
    _ "$BUILD" "$MAKE_CPPFLAGS"
  touch "$WORK/stamps/build"
  rm -f "$PREFIX/BUILD-INFO.txt"
fi
LIBDIR=$PREFIX/lib
EFFECTIVE=$(sed -n 's/^STARPU_EFFECTIVE_VERSION = //p' "$BUILD/Makefile")   # 1.3 / 1.4
PC_NAME=starpu-$EFFECTIVE
LIBSTARPU=$LIBDIR/lib$PC_NAME.so
[ -e "$LIBSTARPU" ] || die "no $LIBSTARPU after make install"

# ---------------------------------------------------------------- 6. libraries to bring along
step "[6/7] copying the non-base libraries libstarpu needs next to it (the GPU machine lacks them)"
# Base libraries (glibc, gcc runtime, udev) are on any Linux; CUDA's come from the GPU machine.
BASE_RE='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libutil|libgcc_s|libstdc\+\+|libudev)\.so'
ldd "$LIBSTARPU" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
  [[ $name =~ $BASE_RE ]] && continue
  case $path in "$CUDA"/*|"$CUDA_HOME"/*|"$LIBDIR"/*) continue ;; esac
  cp -L "$path" "$LIBDIR/$name"
  echo "   $name (from $path)"
done
[ -f "$LIBDIR/libhwloc.so.15" ] || die "libhwloc.so.15 was not copied (does libstarpu use hwloc?)"

# ---------------------------------------------------------------- 7. checks
step "[7/7] checks"
STARPU_VERSION=$(PKG_CONFIG_PATH="$LIBDIR/pkgconfig" pkg-config --modversion "$PC_NAME") \
  || die "pkg-config --modversion $PC_NAME fails with PKG_CONFIG_PATH=$LIBDIR/pkgconfig"
echo "   pkg-config: $PC_NAME $STARPU_VERSION"
CONFIG_H=$(find "$PREFIX/include" -name starpu_config.h | head -n 1)
grep -q '^#define STARPU_USE_CUDA 1' "$CONFIG_H" || die "$CONFIG_H does not define STARPU_USE_CUDA"
echo "   $CONFIG_H: STARPU_USE_CUDA defined"
NSYM=$(nm -D --defined-only "$LIBSTARPU" | grep -c starpu_cuda_get_local_stream || true)
[ "$NSYM" -ge 1 ] || die "$LIBSTARPU does not export starpu_cuda_get_local_stream"
echo "   $(basename "$LIBSTARPU") exports starpu_cuda_get_local_stream ($NSYM)"
echo "   needs: $(readelf -d "$LIBSTARPU" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
[ -f "$PREFIX/BUILD-INFO.txt" ] || cat > "$PREFIX/BUILD-INFO.txt" <<EOF
StarPU $STARPU_VERSION with CUDA, built by scripts/build-starpu-cuda.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)
source: Debian $SUITE_USED starpu $DEB_VERSION
CUDA: $CUDA_VERSION ($CUDA_HOME); wheels: $(cat "$WORK/stamps/wheels")
configure: ${CONFIGURE_ARGS[*]}
EOF

echo
echo "OK: StarPU $STARPU_VERSION with CUDA (Debian $SUITE_USED starpu $DEB_VERSION) in $PREFIX ($(( $(date +%s) - T0 )) s)"
echo "Use it here (the CUDA and cuBLAS libraries come from $CUDA/lib64):"
echo "  export STARPU_PREFIX=$PREFIX"
echo "  export LD_LIBRARY_PATH=$LIBDIR:$CUDA/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
echo "For a GPU machine: scripts/gpu-bundle.sh, then there: source gpu_bundle/env.sh"
