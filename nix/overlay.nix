# `pkgs.securellm`: the workspace package (nix/package.nix). The NixOS module's package default.
final: _prev: {
  securellm = final.callPackage ./package.nix { };
}
