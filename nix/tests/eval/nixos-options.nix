# Stand-ins, with nixpkgs' types and defaults, for the NixOS options nix/module.nix touches that
# ../shared/nix-eval's stub does not declare: environment.systemPackages / environment.etc
# (nixos/modules/config/system-path.nix, system/etc/etc.nix), services.ollama (the options of
# nixos/modules/services/misc/ollama.nix the module reads or sets) and
# services.xserver.videoDrivers. Evaluation only.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options = {
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    environment.etc = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule {
          options = {
            text = mkOption {
              type = types.nullOr types.lines;
              default = null;
            };
            source = mkOption {
              type = types.nullOr types.path;
              default = null;
            };
            mode = mkOption {
              type = types.str;
              default = "symlink";
            };
          };
        }
      );
    };
    services.xserver.videoDrivers = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    services.ollama = {
      enable = lib.mkEnableOption "ollama";
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      group = mkOption {
        type = types.nullOr types.str;
        default = null;
      };
      home = mkOption {
        type = types.str;
        default = "/var/lib/ollama";
      };
      models = mkOption {
        type = types.str;
        default = "/var/lib/ollama/models";
      };
      host = mkOption {
        type = types.str;
        default = "127.0.0.1";
      };
      port = mkOption {
        type = types.port;
        default = 11434;
      };
    };
  };
}
