# The Nix half of the prepare step. nixery-snapshotter evaluates this file
# (with restrict-eval: the package set reads nothing but itself) with
# `--argstr` arguments only: package names and source locations arrive
# as JSON strings and are read with fromJSON, never spliced into Nix code.
#
# It asks nothing of the package set but that it is an attribute set of
# derivations (or a function returning one): no lib, no runCommand.
{ source, packages ? "[]", system ? "", settings ? "{}", explain ? "" }:
let
  inherit (builtins)
    attrNames filter foldl' fromJSON getAttr hasAttr isAttrs isFunction
    listToAttrs map match replaceStrings split;

  src = fromJSON source;
  flake = builtins.getFlake src.flake;
  # A flake's packages, then what only its legacyPackages have.
  flakePackages =
    let sys = if system == "" then builtins.currentSystem else system;
    in (flake.legacyPackages.${sys} or { }) // (flake.packages.${sys} or { });

  tree =
    if src.type == "path" then /. + src.path
    else if src.type == "git" then
      builtins.fetchGit ({ url = src.url; }
        // (if src ? rev then { inherit (src) rev; allRefs = true; } else { })
        // (if src ? ref then { inherit (src) ref; } else { }))
    else if src.type == "channel" then
      (if src ? lookup then builtins.findFile builtins.nixPath src.lookup
       else builtins.fetchTarball src.url)
    else if src.type == "flake" then flake.outPath
    else throw "unknown package source type ${src.type}";

  imported = import tree;
  # nixpkgs' config and overlays, as the operator set them: data (JSON and
  # paths), passed only when set, so that any package set works without.
  given = fromJSON settings;
  args = { inherit system; }
    // (if given ? config then { inherit (given) config; } else { })
    // (if given ? overlays then { overlays = map (p: import (/. + p)) given.overlays; } else { });
  pkgs = if src.type == "flake" then flakePackages
    else if isFunction imported then imported args else imported;

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = replaceStrings upper lower;

  # Image references are lower case, the package set is not
  # (haskellPackages): top-level names are also looked up case-insensitively.
  # Built only when an exact lookup misses.
  lowerTopLevel = listToAttrs (map (n: { name = toLower n; value = n; })
    (filter (n: match ".*[A-Z].*" n != null) (attrNames pkgs)));

  # A component that starts with a digit is not a valid Nix identifier, so
  # package sets prefix it with "_" (nixpkgs' _1password).
  candidates = name: [ name ] ++ (if match "[0-9].*" name != null then [ ("_" + name) ] else [ ]);

  lookupIn = set: name:
    let hits = filter (n: hasAttr n set) (candidates name);
    in if hits == [ ] then null else getAttr (builtins.head hits) set;

  lookupTop = name:
    let exact = lookupIn pkgs name;
    in if exact != null then exact
       else if hasAttr name lowerTopLevel then getAttr (getAttr name lowerTopLevel) pkgs
       else null;

  fetch = name:
    let
      path = filter (s: s != [ ]) (split "\\." name);
      step = acc: component:
        if acc == null || !(isAttrs acc) then null else lookupIn acc component;
      first = lookupTop (builtins.head path);
    in foldl' step first (builtins.tail path);

  isDerivation = v: isAttrs v && v ? type && v.type == "derivation";

  # The outputs a package puts in an image, as nix-env and buildEnv take
  # them: the one an attribute path selected (`openssl.bin`), else the
  # package's meta.outputsToInstall, else its default output.
  install = v:
    let
      default = [ (v.outputName or "out") ];
      wanted = if v.outputSpecified or false then default
        else v.meta.outputsToInstall or default;
    in filter (o: v ? ${o}) wanted;

  requested = fromJSON packages;
  fetched = map (name: { inherit name; value = fetch name; }) requested;
  # What each request is. A package the package set refuses (nixpkgs:
  # unfree, broken, insecure, an alias that was removed) throws when it
  # is looked at or when its outPath is: caught here, so that all of them
  # are named at once (their reasons are asked for one by one, `explain`).
  kind = r:
    let t = builtins.tryEval (
      if r.value == null then "missing"
      else if !(isDerivation r.value) then "notPackage"
      else builtins.seq r.value.outPath "ok");
    in if t.success then t.value else "refused";
  kinds = map (r: r // { kind = kind r; }) fetched;
  named = k: map (r: r.name) (filter (r: r.kind == k) kinds);
  missing = named "missing";
  notPackages = named "notPackage";
  refused = named "refused";
  ok = missing == [ ] && notPackages == [ ] && refused == [ ];
in
{
  # Where a source fetched from a URL (git, a tarball) is in the store:
  # evaluated on its own, unrestricted, before the package set is
  # evaluated restricted to that path. (Nix 2.19 and later check fetchGit's
  # URL, with its query, against allowed-uris, which no prefix matches.)
  sourceTree = toString tree;
  # What was found: evaluated on its own (`-A result`, read-only), so that
  # nothing is written to the store for a request that builds nothing. The
  # package set itself first: if it cannot be evaluated (no source, a
  # syntax error), that is the error, not a refusal of every package.
  result = builtins.seq pkgs {
    inherit missing notPackages refused;
    packages = if !ok then [ ] else map (r: {
      inherit (r) name;
      # Not `outPath`: toJSON would turn the whole set into that string.
      outs = map (o: r.value.${o}.outPath) (install r.value);
      # nixpkgs' name for the program a package is about, if it says.
      mainProgram = let m = (r.value.meta or { }).mainProgram or null; in if builtins.isString m then m else null;
    }) fetched;
  };
  # What to build (`nix-build -A derivations`), in request order: each
  # output to install.
  derivations = if !ok then [ ] else builtins.concatMap (r: map (o: r.value.${o}) (install r.value)) fetched;
  # Why the package set refuses the package named explain: evaluating this
  # fails with its message.
  explanation = (fetch explain).outPath;
}
