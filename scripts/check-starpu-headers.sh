#!/usr/bin/env bash
# Compile check of lotus_rt's StarPU binding against Debian trixie's StarPU 1.4 headers.
#
# Fetches libstarpu-dev (plus the hwloc, OpenCL and PAPI headers starpu.h includes) from trixie with a
# private apt sources list, lists dir and cache (the system's apt configuration is left alone),
# unpacks them with `dpkg -x` into a temporary root, lets lotus_rt/starpu/_build.py find StarPU 1.4
# there through pkg-config (PKG_CONFIG_PATH + PKG_CONFIG_SYSROOT_DIR), writes the cffi-generated C
# of the binding and compiles it to an object file with gcc -c. Linking or loading is not possible
# here: trixie's libstarpu-1.4 needs a newer glibc than bookworm's.
#
#   bash scripts/check-starpu-headers.sh          # or: make check-starpu-1.4
#   KEEP=1 bash scripts/check-starpu-headers.sh   # keep the temporary directory
#
# Environment: PYTHON (default python3, needs cffi), TRIXIE_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
MIRROR=${TRIXIE_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(libstarpu-dev libhwloc-dev opencl-c-headers libpapi-dev)   # starpu.h includes hwloc.h, CL/cl.h, papi.h

"$PYTHON" -c "import cffi" 2>/dev/null || { echo "check-starpu-headers: $PYTHON cannot import cffi (run: make deps)" >&2; exit 2; }
command -v gcc >/dev/null || { echo "check-starpu-headers: gcc not found" >&2; exit 2; }

WORK=$(mktemp -d /tmp/lotus-starpu14.XXXXXX)
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$WORK"' EXIT; else echo "check-starpu-headers: keeping $WORK"; fi
chmod 755 "$WORK"   # apt's download sandbox user (_apt) must reach the directories below
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs" "$WORK/root"
echo "deb $MIRROR trixie main" > "$WORK/sources.list"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
  chown -R _apt "$WORK/lists" "$WORK/cache" "$WORK/debs"
fi

APT_OPTS=(
  -o "Dir::Etc::SourceList=$WORK/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$WORK/lists"
  -o "Dir::Cache=$WORK/cache"
  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
  -o "Debug::NoLocking=1"
  -o "APT::Get::List-Cleanup=0"
)

echo "== fetching ${PACKAGES[*]} from trixie ($MIRROR)"
apt-get "${APT_OPTS[@]}" -qq update
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PACKAGES[@]}")
for deb in "$WORK"/debs/*.deb; do
  echo "   $(basename "$deb")"
  dpkg -x "$deb" "$WORK/root"
done

MULTIARCH=$(gcc -print-multiarch)
export PKG_CONFIG_PATH="$WORK/root/usr/lib/$MULTIARCH/pkgconfig:$WORK/root/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export PKG_CONFIG_SYSROOT_DIR="$WORK/root"   # the .pc files say prefix=/usr
unset STARPU_PREFIX

echo "== generating the binding's C with lotus_rt/starpu/_build.py"
"$PYTHON" - "$REPO/lotus_rt/starpu/_build.py" "$WORK" <<'EOF'
import importlib.util, shlex, sys, sysconfig

build_file, work = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("_lotus_build_check", build_file)
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
name, version, cflags, libs = build.find_starpu()
print(f"   pkg-config: {name} {version}")
print(f"   cflags: {' '.join(cflags)}")
if not version.startswith("1.4"):
    sys.exit(f"check-starpu-headers: expected StarPU 1.4 headers, pkg-config gave {name} {version}")
ffi = build.make_ffibuilder()
kwds = ffi._assigned_source[3]          # what set_source() was given: include dirs, flags
src = f"{work}/_lotus_starpu.c"
ffi.emit_c_code(src)
with open(src, "a") as f:               # prove the headers compiled against are 1.4's
    f.write('\n_Static_assert(STARPU_MAJOR_VERSION == 1 && STARPU_MINOR_VERSION == 4, '
            '"not StarPU 1.4 headers");\n')
args = [f"-I{d}" for d in kwds.get("include_dirs", [])]
args += [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in kwds.get("define_macros", [])]
args += list(kwds.get("extra_compile_args", []))
args += [f"-I{sysconfig.get_paths()['include']}"]
with open(f"{work}/gcc-args", "w") as f:
    f.write(shlex.join(args))
EOF

HEADER_DIR="$WORK/root/usr/include/starpu/1.4"
printf '#include <starpu_config.h>\nSTARPU_MAJOR_VERSION.STARPU_MINOR_VERSION.STARPU_RELEASE_VERSION\n' > "$WORK/v.c"
HEADER_VERSION=$(gcc -E -P -I"$HEADER_DIR" "$WORK/v.c" | tr -d ' ' | tail -n 1)
echo "== compiling against StarPU $HEADER_VERSION headers ($HEADER_DIR)"
eval "GCC_ARGS=($(cat "$WORK/gcc-args"))"
GCC_CMD=(gcc -c -fPIC -std=gnu11 "${GCC_ARGS[@]}"
  -Werror=implicit-function-declaration -Werror=incompatible-pointer-types -Werror=int-conversion
  -Werror=return-type "$WORK/_lotus_starpu.c" -o "$WORK/_lotus_starpu.o")
echo "   ${GCC_CMD[*]}"
if ! "${GCC_CMD[@]}" 2>&1; then
  echo "FAILED: lotus_rt's StarPU binding does not compile against StarPU $HEADER_VERSION headers" >&2
  exit 1
fi
echo "OK: lotus_rt's StarPU binding compiles against StarPU $HEADER_VERSION headers (Debian trixie libstarpu-dev $(dpkg-deb -f "$WORK"/debs/libstarpu-dev_*.deb Version))"
