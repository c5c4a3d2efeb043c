# For users without flakes:
#
#   let securellm = import (fetchTarball "https://…/securellm.tar.gz") { inherit pkgs; };
#   in { imports = [ securellm.nixosModule ]; services.securellm.enable = true; }
#
# `imports = [ "${src}/nix/module.nix" ]` works as well: the module builds the package from the
# same tree when `pkgs.securellm` is absent.
{
  pkgs ? import <nixpkgs> { },
}:
{
  package = pkgs.callPackage ./nix/package.nix { };
  nixosModule = ./nix/module.nix;
  overlay = import ./nix/overlay.nix;
}
