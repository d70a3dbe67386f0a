# An offline, nixpkgs-shaped package set for tests and the demo.
#
# nixpkgs cannot be downloaded on air-gapped hosts, so these packages are
# built from the host's own programs (Debian 12, x86_64): each one copies its
# binaries into the store and points their ELF interpreter and run path at
# separate library packages. The attribute names are nixpkgs' names, so the
# same image references work against real nixpkgs.
#
# Needs Nix with `sandbox = false` (the builders read the host's /usr) and,
# for the aarch64-linux variants, `extra-platforms = aarch64-linux`. The
# aarch64 variants carry the host's files: they exist to test image metadata.
{ system ? builtins.currentSystem, config ? { }, ... }:
let
  mk = name: attrs: derivation ({
    inherit name system;
    builder = "/bin/bash";
    args = [ ./builder.sh ];
    PATH = "/usr/bin:/bin";
    libs = "";
    bins = "";
    files = "";
    script = "";
    scriptName = "";
    libDeps = [ ];
    interpreter = "${glibc}/lib/ld-linux-x86-64.so.2";
  } // attrs);

  lib = name: libs: libDeps: mk name { inherit libs libDeps; };
  program = name: bins: libDeps: mk name { inherit bins; libDeps = [ glibc ] ++ libDeps; };
  script = name: scriptName: text: mk name {
    inherit scriptName;
    script = "#!${bashInteractive}/bin/bash\n${text}\n";
  };

  # nixpkgs' check-meta, in small: a package that is unfree (unless
  # config.allowUnfree) or broken (unless config.allowBroken) throws, with
  # nixpkgs' wording, when its derivation is looked at.
  checkMeta = pkg:
    let
      refuse = why: pkg // { drvPath = throw why; outPath = throw why; };
      name = pkg.name;
    in
    if !(pkg.meta.license.free or true) && !(config.allowUnfree or false) then
      refuse "Package ‘${name}’ has an unfree license (‘${pkg.meta.license.shortName}’), refusing to evaluate."
    else if (pkg.meta.broken or false) && !(config.allowBroken or false) then
      refuse "Package ‘${name}’ is marked as broken, refusing to evaluate."
    else pkg;

  glibc = mk "glibc-2.36" {
    libs = "ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libresolv.so.2";
    interpreter = "";
  };
  ncurses = lib "ncurses-6.4" "libtinfo.so.6 libncursesw.so.6" [ glibc ];
  pcre2 = lib "pcre2-10.42" "libpcre2-8.so.0" [ glibc ];
  zlib = lib "zlib-1.2.13" "libz.so.1" [ glibc ];
  libnl = lib "libnl-3.7.0" "libnl-3.so.200 libnl-genl-3.so.200" [ glibc ];
  oniguruma = lib "oniguruma-6.9.8" "libonig.so.5" [ glibc ];
  libselinux = lib "libselinux-3.4" "libselinux.so.1" [ glibc pcre2 ];
  attr = lib "attr-2.5.1" "libattr.so.1" [ glibc ];
  acl = lib "acl-2.3.1" "libacl.so.1" [ glibc attr ];
  gmp = lib "gmp-6.2.1" "libgmp.so.10" [ glibc ];
  jqLib = lib "jq-1.6-lib" "libjq.so.1" [ glibc oniguruma ];

  bashInteractive = program "bash-interactive-5.2" "bash" [ ncurses ];
  coreutils = program "coreutils-9.1" (builtins.concatStringsSep " " [
    "[" "b2sum" "base32" "base64" "basename" "basenc" "cat" "chgrp" "chmod" "chown"
    "cksum" "comm" "cp" "csplit" "cut" "date" "dd" "df" "dir" "dircolors" "dirname"
    "du" "echo" "env" "expand" "expr" "factor" "false" "fmt" "fold" "groups" "head"
    "hostid" "id" "install" "join" "link" "ln" "logname" "ls" "md5sum" "mkdir"
    "mkfifo" "mknod" "mktemp" "mv" "nice" "nl" "nohup" "nproc" "numfmt" "od" "paste"
    "pathchk" "pr" "printenv" "printf" "ptx" "pwd" "readlink" "realpath" "rm" "rmdir"
    "seq" "sha1sum" "sha224sum" "sha256sum" "sha384sum" "sha512sum" "shred" "shuf"
    "sleep" "sort" "split" "stat" "stty" "sum" "sync" "tac" "tail" "tee" "test"
    "timeout" "touch" "tr" "true" "truncate" "tsort" "tty" "uname" "unexpand" "uniq"
    "unlink" "vdir" "wc" "whoami" "yes"
  ]) [ libselinux pcre2 acl attr gmp ];
in
{
  inherit glibc ncurses pcre2 zlib libnl oniguruma libselinux attr acl gmp;
  inherit bashInteractive coreutils;
  bash = bashInteractive;

  moreutils = program "moreutils-0.67" "sponge ifne pee mispipe isutf8" [ ];
  nano = program "nano-7.2" "nano" [ ncurses ];
  htop = program "htop-3.2.2" "htop" [ ncurses libnl ];
  git = program "git-2.39.5" "git" [ pcre2 zlib ];
  # jq's library lives in its own package output, as in nixpkgs' jq.
  jq = mk "jq-1.6" {
    bins = "jq";
    libDeps = [ glibc oniguruma jqLib ];
  };

  cacert = mk "nss-cacert-3.87" {
    files = "/etc/ssl/certs/ca-certificates.crt=etc/ssl/certs/ca-bundle.crt";
  };
  iana-etc = mk "iana-etc-20230316" {
    files = "/etc/protocols=etc/protocols /etc/services=etc/services";
  };

  # A nested package set with a camelCase name, reached as
  # `haskellpackages.hello` from a (lower-case) image reference.
  haskellPackages = {
    hello = script "hello-1.0" "hello" "echo 'Hello from haskellPackages.hello'";
  };

  # A sandbox ("pause") image for Kubernetes pods: sleeps until stopped.
  # meta.mainProgram makes it the image's default command.
  pause = script "pause-3.10" "pause" ''
    trap 'exit 0' TERM INT
    while :; do ${coreutils}/bin/sleep 3600 & wait $!; done
  '' // { meta.mainProgram = "pause"; };

  # An attribute whose registry name starts with a digit (`1password`).
  _1password = script "1password-cli-2.0" "op" "echo 'op 2.0 (offline test build)'";

  # A package of several outputs, as nixpkgs' openssl: an image holds
  # those meta.outputsToInstall names (bin, man), not the libraries (out).
  openssl = derivation {
    name = "openssl-3.0.16"; inherit system; builder = "/bin/bash"; PATH = "/usr/bin:/bin";
    outputs = [ "bin" "out" "man" ];
    args = [ "-c" ''
      mkdir -p $bin/bin $out/lib $man/share/man/man1
      printf '#!${bashInteractive}/bin/bash\necho OpenSSL 3.0.16\n' > $bin/bin/openssl; chmod +x $bin/bin/openssl
      echo library > $out/lib/libssl.so.3
      echo manual > $man/share/man/man1/openssl.1
      (sleep 0.2 &) # see builder.sh
    '' ];
  } // { meta.outputsToInstall = [ "bin" "man" ]; };

  # Packages nixpkgs refuses: unfree, broken, and an alias that was removed.
  unfreetool = checkMeta (script "unfreetool-1.0" "unfreetool" "echo 'unfreetool 1.0'"
    // { meta.license = { free = false; shortName = "unfree"; }; });
  brokentool = checkMeta (script "brokentool-1.0" "brokentool" "echo 'brokentool 1.0'"
    // { meta.broken = true; });
  oldtool = throw "'oldtool' has been renamed to/replaced by 'htop'";
}
