# NixOS module: `imports = [ ./nix/module.nix ];` then `services.securellm.enable = true;`.
#
# One import, four systemd units (vram-scheduler, registry, backend-manager, securellm-gateway),
# one TOML config file generated from `services.securellm.settings`, one state directory.
# Written to the binaries' documented flags; NOT evaluated on the development machine (no Nix
# there) — treat it as a starting point and report what breaks.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.securellm;
  toml = pkgs.formats.toml { };
  configFile = toml.generate "securellm.toml" cfg.settings;
  common = name: extra: {
    description = "SecureLLM ${name}";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ] ++ extra.after or [ ];
    requires = extra.requires or [ ];
    environment = {
      SECURELLM_CONFIG = "${configFile}";
      SECURELLM_DATA_DIR = "/var/lib/securellm/${name}";
      RUST_LOG = cfg.logLevel;
    } // (extra.environment or { });
    serviceConfig = {
      ExecStart = "${cfg.package}/bin/${name} ${lib.escapeShellArgs (extra.args or [ ])}";
      StateDirectory = "securellm/${name}";
      DynamicUser = extra.dynamicUser or true;
      User = lib.mkIf (!(extra.dynamicUser or true)) "securellm";
      Group = lib.mkIf (!(extra.dynamicUser or true)) "securellm";
      Restart = "on-failure";
      RestartSec = 2;
      # The backend manager kills its llama-server children on stop (SIGTERM, then SIGKILL).
      KillMode = "mixed";
      TimeoutStopSec = 15;
      NoNewPrivileges = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
    } // (extra.serviceConfig or { });
  };
in
{
  options.services.securellm = {
    enable = lib.mkEnableOption "the SecureLLM stack (scheduler, registry, backend manager, gateway)";
    package = lib.mkOption {
      type = lib.types.package;
      description = "A package providing vram-scheduler, registry, backend-manager, securellm-gateway and securellm.";
    };
    llamaServer = lib.mkOption {
      type = lib.types.path;
      default = "${pkgs.llama-cpp}/bin/llama-server";
      description = "The llama-server binary the backend manager starts.";
    };
    modelRoots = lib.mkOption {
      type = lib.types.listOf lib.types.path;
      default = [ ];
      example = [ "/srv/models" "/var/lib/ollama/models" ];
      description = "Directories the registry scans (GGUF, split GGUF, Ollama store, safetensors).";
    };
    logLevel = lib.mkOption { type = lib.types.str; default = "info"; };
    settings = lib.mkOption {
      type = toml.type;
      default = { };
      description = "The shared TOML config ([scheduler], [registry], [backend], [gateway], [models]); see README.";
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.securellm = { isSystemUser = true; group = "securellm"; extraGroups = [ "video" ]; };
    users.groups.securellm = { };

    services.securellm.settings.models.roots = lib.mkDefault (map toString cfg.modelRoots);

    systemd.services.securellm-vram-scheduler = common "vram-scheduler" {
      # NVML needs the driver's device nodes.
      dynamicUser = false;
      serviceConfig.SupplementaryGroups = [ "video" ];
    };
    systemd.services.securellm-registry = common "registry" {
      serviceConfig.ReadOnlyPaths = cfg.modelRoots;
    };
    systemd.services.securellm-backend-manager = common "backend-manager" {
      after = [ "securellm-vram-scheduler.service" "securellm-registry.service" ];
      requires = [ "securellm-vram-scheduler.service" "securellm-registry.service" ];
      args = [ "--llama-server" cfg.llamaServer ];
      dynamicUser = false;
      serviceConfig = {
        SupplementaryGroups = [ "video" ];
        ReadOnlyPaths = cfg.modelRoots;
      };
    };
    systemd.services.securellm-gateway = common "securellm-gateway" {
      after = [ "securellm-backend-manager.service" ];
      requires = [ "securellm-backend-manager.service" ];
      args = [ "--bootstrap-key-file" "/var/lib/securellm/securellm-gateway/api-key" ];
    };
  };
}
