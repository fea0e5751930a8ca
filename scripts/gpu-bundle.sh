#!/usr/bin/env bash
# Assembles gpu_bundle/: what a GPU machine (Ubuntu 24.04, Python 3.12, no package registry, no
# cffi) needs to build and run lotus_rt's binding against the CUDA StarPU made by
# scripts/build-starpu-cuda.sh. The bundle holds:
#   starpu/lib        libstarpu (stripped) and the libraries copied next to it (libhwloc.so.15),
#   starpu/lib/pkgconfig/starpu-X.Y.pc   relocatable (${pcfiledir}), no Requires, no build paths,
#   starpu/include    StarPU's headers, plus include/deps: the CUDA, cuBLAS/cuSPARSE and hwloc
#                     headers that StarPU's headers pull in (found with gcc -M; glibc's left out;
#                     marked as system headers),
#   wheels/           cp312 manylinux wheels of cffi, pycparser, setuptools (cffi compiles with
#                     it on 3.12) and threadpoolctl (lotus_rt's CLI imports it), by `pip download`,
#                     at the versions $PYTHON has here (tested together), unpinned where it has none,
#   bin/pkg-config    a small stand-in, put on PATH by env.sh only where pkg-config is missing,
#   env.sh            `source gpu_bundle/env.sh` there: STARPU_PREFIX, PKG_CONFIG_PATH,
#                     LD_LIBRARY_PATH (with the machine's CUDA 13 libraries), the wheels of what
#                     python3 lacks installed into gpu_bundle/pylib with pip --no-index --target,
#                     PYTHONPATH.
# It fails if the bundle exceeds 64 MiB, and prints its size.
#
#   scripts/gpu-bundle.sh [--prefix DIR] [--out DIR]    # defaults: .starpu-cuda, gpu_bundle
#
# Environment: PYTHON (default python3, for pip download).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=$REPO/.starpu-cuda
OUT=$REPO/gpu_bundle
PYTHON=${PYTHON:-python3}
LIMIT_MIB=64
WHEEL_NAMES=(cffi pycparser setuptools threadpoolctl)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu-bundle: ERROR: $*" >&2; exit 1; }
step() { echo "== $*"; }

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -d "$PREFIX" ] || die "no StarPU prefix $PREFIX (run scripts/build-starpu-cuda.sh first)"
PREFIX=$(cd "$PREFIX" && pwd)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
LIBSTARPU=$(find "$PREFIX/lib" -maxdepth 1 -name 'libstarpu-*.so' 2>/dev/null | head -n 1)
[ -n "$LIBSTARPU" ] || die "no libstarpu-*.so in $PREFIX/lib (run scripts/build-starpu-cuda.sh first)"
PC_NAME=$(basename "$LIBSTARPU" .so); PC_NAME=${PC_NAME#lib}          # starpu-1.3
PC_VERSION=${PC_NAME#starpu-}                                          # 1.3
PC_ENV=(env PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig")
VERSION=$("${PC_ENV[@]}" pkg-config --modversion "$PC_NAME") || die "pkg-config does not find $PC_NAME in $PREFIX"
grep -q '^#define STARPU_USE_CUDA 1' "$PREFIX/include/starpu/$PC_VERSION/starpu_config.h" \
  || die "$PREFIX is a StarPU without CUDA"
echo "gpu-bundle: StarPU $VERSION from $PREFIX -> $OUT"

# ---------------------------------------------------------------- StarPU: libraries and headers
step "StarPU libraries and headers"
rm -rf "$OUT/starpu" "$OUT/bin" "$OUT/pylib" "$OUT/env.sh"
B=$OUT/starpu
mkdir -p "$B/lib/pkgconfig" "$B/include/deps" "$OUT/bin"
cp -a "$PREFIX/lib/lib$PC_NAME".so* "$B/lib/"
# and the libraries libstarpu needs that the build copied next to it (libhwloc.so.15)
for name in $(readelf -d "$LIBSTARPU" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
  if [ -e "$PREFIX/lib/$name" ]; then cp -L "$PREFIX/lib/$name" "$B/lib/"; fi
done
for f in "$B"/lib/*.so*; do
  [ -L "$f" ] && continue
  strip --strip-unneeded "$f"
  echo "   lib/$(basename "$f") ($(( $(stat -c %s "$f") / 1024 )) KiB stripped)"
done
cp -a "$PREFIX/include/starpu" "$B/include/"
[ -f "$PREFIX/BUILD-INFO.txt" ] && cp "$PREFIX/BUILD-INFO.txt" "$OUT/"

# Headers outside StarPU's that its headers include, and that a GPU machine may not have: CUDA's
# and the cuBLAS/cuSPARSE wheels' (from the build's CUDA include dir) and hwloc's. glibc's and
# the kernel's headers (libc6-dev, linux-libc-dev) and gcc's own are there wherever gcc is.
# Each copy starts with `#pragma GCC system_header`: starpu.h includes cusparse.h, whose
# thousands of deprecation warnings would otherwise bury the binding's build log.
step "headers StarPU's headers include (gcc -M over each installed StarPU header)"
SP_INC=$PREFIX/include/starpu/$PC_VERSION
read -r -a CFLAGS_I <<< "$("${PC_ENV[@]}" pkg-config --cflags-only-I "$PC_NAME")"
ROOTS=()
for f in "${CFLAGS_I[@]}"; do d=${f#-I}; [ "$d" = "$SP_INC" ] || ROOTS+=("$d"); done
ROOTS+=(/usr/include/x86_64-linux-gnu /usr/include)
TMP=$(mktemp -d /tmp/gpu-bundle.XXXXXX); trap 'rm -rf "$TMP"' EXIT
dpkg -L libc6-dev linux-libc-dev 2>/dev/null | sort -u > "$TMP/base-headers" || true
: > "$TMP/deps"
for h in "$SP_INC"/*.h; do
  printf '#include <starpu.h>\n#include <%s>\n' "$(basename "$h")" > "$TMP/probe.c"   # starpu.h: config macros
  if gcc -M "${CFLAGS_I[@]}" "$TMP/probe.c" > "$TMP/probe.d" 2>/dev/null; then
    tr ' \\' '\n\n' < "$TMP/probe.d" | grep -E '^/' >> "$TMP/deps" || true
  else
    echo "   (skipped $(basename "$h"): does not compile on its own)"
  fi
done
NDEPS=0
for p in $(sort -u "$TMP/deps"); do
  case $p in "$SP_INC"/*|/usr/lib/gcc/*|"$TMP"/*) continue ;; esac
  grep -qxF "$p" "$TMP/base-headers" && continue
  rel=""
  for r in "${ROOTS[@]}"; do
    case $p in "$r"/*) rel=${p#"$r"/}; break ;; esac
  done
  [ -n "$rel" ] || die "header $p is under none of: ${ROOTS[*]}"
  mkdir -p "$B/include/deps/$(dirname "$rel")"
  { echo "#pragma GCC system_header /* gpu-bundle.sh: no warnings from here */"; cat "$p"; } > "$B/include/deps/$rel"
  NDEPS=$((NDEPS + 1))
done
echo "   $NDEPS headers in starpu/include/deps ($(du -sh "$B/include/deps" | cut -f1))"

# A .pc that works wherever the bundle lands: no build-machine paths, no Requires (hwloc's .pc is
# not on the GPU machine; its headers are in deps, libhwloc.so.15 in lib).
OTHER_CFLAGS=$("${PC_ENV[@]}" pkg-config --cflags-only-other "$PC_NAME" | sed 's/ *$//')
cat > "$B/lib/pkgconfig/$PC_NAME.pc" <<EOF
# StarPU $VERSION with CUDA, bundled by scripts/gpu-bundle.sh (relocatable: paths from pcfiledir)
prefix=\${pcfiledir}/../..
exec_prefix=\${prefix}
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: starpu
Description: StarPU $VERSION with CUDA workers (lotus_rt GPU bundle)
Version: $VERSION
Cflags: -I\${includedir}/starpu/$PC_VERSION -I\${includedir}/deps${OTHER_CFLAGS:+ $OTHER_CFLAGS}
Libs: -L\${libdir} -l$PC_NAME
EOF
echo "   lib/pkgconfig/$PC_NAME.pc: $(PKG_CONFIG_PATH="$B/lib/pkgconfig" pkg-config --cflags --libs "$PC_NAME")"

# ---------------------------------------------------------------- pkg-config stand-in
cat > "$OUT/bin/pkg-config" <<'EOF'
#!/usr/bin/env python3
"""pkg-config stand-in of the lotus_rt GPU bundle, for machines without pkg-config.

Understands --modversion, --cflags, --libs and --exists for .pc files found on PKG_CONFIG_PATH,
with ${variable} expansion (pcfiledir included). Requires lines are ignored.
"""
import os
import re
import sys


def load(name):
    for d in filter(None, os.environ.get("PKG_CONFIG_PATH", "").split(os.pathsep)):
        path = os.path.join(d, name + ".pc")
        if not os.path.isfile(path):
            continue
        variables = {"pcfiledir": os.path.dirname(os.path.abspath(path))}
        fields = {}
        with open(path) as f:
            for line in f:
                m = re.match(r"\s*([\w.]+)\s*([=:])\s*(.*?)\s*$", line)
                if not m or line.lstrip().startswith("#"):
                    continue
                key, sep, value = m.groups()
                value = re.sub(r"\$\{(\w+)\}", lambda v: variables.get(v.group(1), ""), value)
                (variables if sep == "=" else fields)[key] = value
        return fields
    return None


opts = [a for a in sys.argv[1:] if a.startswith("-")]
names = [a for a in sys.argv[1:] if not a.startswith("-")]
field = {"--modversion": "Version", "--cflags": "Cflags", "--libs": "Libs", "--exists": None}
bad = [o for o in opts if o not in field]
if bad or not names:
    sys.exit(f"pkg-config (bundle stand-in): unsupported arguments {bad or 'without a package'}")
out = []
for name in names:
    fields = load(name)
    if fields is None:
        sys.exit(f"Package {name} was not found in the pkg-config search path (bundle stand-in)")
    out += [fields.get(field[o], "") for o in opts if field[o]]
if out:
    print(" ".join(x for x in out if x))
EOF
chmod +x "$OUT/bin/pkg-config"

# ---------------------------------------------------------------- wheels
mapfile -t WHEEL_REQS < <("$PYTHON" - "${WHEEL_NAMES[@]}" <<'EOF'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
)
step "wheels for Python 3.12: ${WHEEL_REQS[*]}"
if [ "$(cat "$OUT/wheels/REQUIREMENTS" 2>/dev/null)" = "${WHEEL_REQS[*]}" ]; then
  echo "   already in $OUT/wheels"
else
  rm -rf "$OUT/wheels"
  "$PYTHON" -m pip download --disable-pip-version-check -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$OUT/wheels" "${WHEEL_REQS[@]}" \
    || die "pip download of ${WHEEL_REQS[*]} failed"
  echo "${WHEEL_REQS[*]}" > "$OUT/wheels/REQUIREMENTS"
fi
for w in "$OUT"/wheels/*.whl; do echo "   $(basename "$w")"; done

# ---------------------------------------------------------------- env.sh
step "env.sh"
cat > "$OUT/env.sh" <<'EOF'
# lotus_rt GPU bundle: `source gpu_bundle/env.sh` (bash) on the GPU machine, from any directory.
# Points STARPU_PREFIX / PKG_CONFIG_PATH / LD_LIBRARY_PATH at the bundled CUDA StarPU and the
# machine's CUDA 13 libraries (CUDA_LIB overrides their folder), installs the bundled wheels that
# python3 lacks into gpu_bundle/pylib once (pip --no-index --target; unzipped if pip is missing;
# PYTHON picks another interpreter), and puts pylib on PYTHONPATH. Then benchmarks/gpu_run.sh installs
# the checkout (setup.py build: kernels/ becomes lotus_rt.kernels, the binding is compiled there).
_lb_dir=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
_lb_cuda=${CUDA_LIB:-/usr/local/cuda-13.0/targets/x86_64-linux/lib}
_lb_py=${PYTHON:-python3}
_lb_prepend() {  # _lb_prepend VAR DIR: DIR goes first in the colon list VAR, once
  case ":${!1:-}:" in *":$2:"*) ;; *) export "$1=$2${!1:+:${!1}}" ;; esac
}
export STARPU_PREFIX="$_lb_dir/starpu"
_lb_prepend PKG_CONFIG_PATH "$STARPU_PREFIX/lib/pkgconfig"
_lb_prepend LD_LIBRARY_PATH "$_lb_cuda"
_lb_prepend LD_LIBRARY_PATH "$STARPU_PREFIX/lib"
command -v pkg-config >/dev/null 2>&1 || _lb_prepend PATH "$_lb_dir/bin"
if [ ! -f "$_lb_dir/pylib/.installed" ]; then
  mkdir -p "$_lb_dir/pylib"
  _lb_need=()   # only what this Python lacks: pylib must not shadow its own setuptools etc.
  for _lb_w in "$_lb_dir"/wheels/*.whl; do
    _lb_name=$(basename "$_lb_w"); _lb_name=${_lb_name%%-*}
    "$_lb_py" -c 'import importlib.util as u, sys; sys.exit(u.find_spec(sys.argv[1]) is not None)' "$_lb_name" \
      && _lb_need+=("$_lb_w")
  done
  if [ ${#_lb_need[@]} -eq 0 ]; then
    true
  elif "$_lb_py" -m pip --version >/dev/null 2>&1; then
    echo "env.sh: installing ${_lb_need[*]##*/} into $_lb_dir/pylib"
    PIP_ROOT_USER_ACTION=ignore "$_lb_py" -m pip install -q --disable-pip-version-check --no-index --find-links "$_lb_dir/wheels" \
      --target "$_lb_dir/pylib" "${_lb_need[@]}"
  else
    for _lb_w in "${_lb_need[@]}"; do "$_lb_py" -m zipfile -e "$_lb_w" "$_lb_dir/pylib" || break; done
  fi && touch "$_lb_dir/pylib/.installed" || echo "env.sh: WARNING: installing the wheels into $_lb_dir/pylib failed" >&2
fi
_lb_prepend PYTHONPATH "$_lb_dir/pylib"
for _lb_lib in libcudart.so.13 libcublas.so.13; do
  [ -e "$_lb_cuda/$_lb_lib" ] || echo "env.sh: WARNING: no $_lb_lib in $_lb_cuda (set CUDA_LIB)" >&2
done
"$_lb_py" -c 'import sys, sysconfig, os
v = sys.version_info[:2]
if v != (3, 12): print(f"env.sh: WARNING: {sys.executable} is Python {v[0]}.{v[1]}; the wheels are for 3.12", file=sys.stderr)
if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
    print("env.sh: WARNING: no Python.h: the binding cannot be compiled with this Python", file=sys.stderr)'
command -v gcc >/dev/null 2>&1 || echo "env.sh: WARNING: no gcc: the binding cannot be compiled" >&2
echo "env.sh: STARPU_PREFIX=$STARPU_PREFIX ($(cat "$_lb_dir/BUILD-INFO.txt" 2>/dev/null | head -n 1))"
echo "env.sh: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "env.sh: PYTHONPATH=$PYTHONPATH"
unset _lb_dir _lb_cuda _lb_py _lb_w _lb_lib _lb_name _lb_need
unset -f _lb_prepend
EOF

# ---------------------------------------------------------------- size
BYTES=$(du -sb "$OUT" | cut -f1)
MIB=$(( (BYTES + 1048575) / 1048576 ))
echo
echo "gpu-bundle: $OUT is $MIB MiB ($BYTES bytes; limit $LIMIT_MIB MiB)"
[ "$BYTES" -le $(( LIMIT_MIB * 1048576 )) ] || die "the bundle is over $LIMIT_MIB MiB"
echo "On the GPU machine, from the checkout: OUT=\$OUT bash benchmarks/gpu_run.sh (sources env.sh, installs the checkout)"
