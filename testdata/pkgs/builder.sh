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

# check_needed fails when an ELF file needs a library that none of its
# run-path directories provides: a silent fallback to the host would make
# the package work here and break inside a container.
check_needed() {
  local file=$1 dirs=$2 soname dir found
  for soname in $(patchelf --print-needed "$file"); do
    case "$soname" in ld-linux*) continue ;; esac
    found=""
    IFS=: read -ra dirarr <<<"$dirs"
    for dir in "${dirarr[@]}"; do
      [ -e "$dir/$soname" ] && found=1 && break
    done
    if [ -z "$found" ]; then
      echo "builder: $file needs $soname, which no dependency provides" >&2
      return 1
    fi
  done
}

mkdir -p "$out"

if [ -n "$libs" ]; then
  mkdir -p "$out/lib"
  for lib in $libs; do
    cp "$(hostfile "$lib")" "$out/lib/$lib"
    chmod u+w "$out/lib/$lib"
    case "$lib" in
      ld-linux*) ;;
      *)
        patchelf --set-rpath "$out/lib${rpath:+:$rpath}" "$out/lib/$lib"
        check_needed "$out/lib/$lib" "$out/lib${rpath:+:$rpath}"
        ;;
    esac
  done
fi

if [ -n "$bins" ]; then
  mkdir -p "$out/bin"
  for bin in $bins; do
    cp "$(hostfile "$bin")" "$out/bin/$bin"
    chmod u+w "$out/bin/$bin"
    patchelf --set-interpreter "$interpreter" --set-rpath "$rpath" "$out/bin/$bin"
    check_needed "$out/bin/$bin" "$rpath"
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
