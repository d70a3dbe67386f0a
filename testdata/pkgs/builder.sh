# Builder for the offline test package set: copies host programs, libraries
# and data files into $out and rewrites ELF interpreters and run paths onto
# store paths, so Nix's reference scanner records a real runtime graph and
# the programs run inside a container that holds only their closure.
set -euo pipefail

# Nix 2.8 was seen here failing builds "due to signal 9" at random: it
# kills the builder's process group once the log pipe closes, which can
# race the builder's own exit. A child holding the pipe a moment longer
# than the builder lets it exit first.
trap '(sleep 0.2 &)' EXIT

hostfile() {
  local d
  for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /usr/bin /bin /usr/sbin /sbin; do
    if [ -e "$d/$1" ]; then readlink -f "$d/$1"; return 0; fi
  done
  echo "builder: $1 not found on the host" >&2
  return 1
}

rpath=""
for dep in $libDeps; do rpath="${rpath:+$rpath:}$dep/lib"; done

# provide_needed makes every library an ELF file needs found on its run
# path: from the dependencies, or else copied from the host into $out/lib
# (with what it needs in turn). So the package set names only the
# libraries its packages share, and builds on any glibc-based host whose
# programs need others; a library on no run path would make the package
# work here and break inside a container.
provide_needed() {
  local file=$1 soname dir found src
  for soname in $(patchelf --print-needed "$file"); do
    case "$soname" in ld-linux*) continue ;; esac
    found=""
    IFS=: read -ra dirarr <<<"$out/lib${rpath:+:$rpath}"
    for dir in "${dirarr[@]}"; do
      [ -e "$dir/$soname" ] && found=1 && break
    done
    [ -n "$found" ] && continue
    if ! src=$(hostfile "$soname"); then
      echo "builder: $file needs $soname, which neither a dependency nor the host provides" >&2
      return 1
    fi
    echo "builder: $soname (for $(basename "$file")) copied from the host: no dependency provides it here" >&2
    mkdir -p "$out/lib"
    cp "$src" "$out/lib/$soname"
    chmod u+w "$out/lib/$soname"
    patchelf --set-rpath "$out/lib${rpath:+:$rpath}" "$out/lib/$soname"
    provide_needed "$out/lib/$soname"
  done
}

# runpath is where a file of this package finds its libraries.
runpath() {
  if [ -d "$out/lib" ]; then echo "$out/lib${rpath:+:$rpath}"; else echo "$rpath"; fi
}

mkdir -p "$out"

if [ -n "$libs" ]; then
  mkdir -p "$out/lib"
  for lib in $libs; do
    # A library this host does not have is one no program here needs.
    if ! src=$(hostfile "$lib" 2>/dev/null); then
      echo "builder: $lib is not on this host: left out" >&2
      continue
    fi
    cp "$src" "$out/lib/$lib"
    chmod u+w "$out/lib/$lib"
    case "$lib" in
      ld-linux*) ;;
      *)
        patchelf --set-rpath "$out/lib${rpath:+:$rpath}" "$out/lib/$lib"
        provide_needed "$out/lib/$lib"
        ;;
    esac
  done
fi

if [ -n "$bins" ]; then
  mkdir -p "$out/bin"
  for bin in $bins; do
    cp "$(hostfile "$bin")" "$out/bin/$bin"
    chmod u+w "$out/bin/$bin"
    patchelf --set-interpreter "$interpreter" "$out/bin/$bin"
    provide_needed "$out/bin/$bin"
  done
  for bin in $bins; do
    patchelf --set-rpath "$(runpath)" "$out/bin/$bin"
  done
fi

for pair in $files; do
  src=${pair%%=*} dst=$out/${pair#*=}
  mkdir -p "$(dirname "$dst")"
  cp "$src" "$dst"
done

if [ -n "$script" ]; then
  mkdir -p "$out/bin"
  printf '%s' "$script" >"$out/bin/$scriptName"
  chmod 0555 "$out/bin/$scriptName"
fi
