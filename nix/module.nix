# NixOS module: `imports = [ securellm.nixosModules.default ];` (flake) or
# `imports = [ "${securellm-src}/nix/module.nix" ];`, then `services.securellm.enable = true;`.
#
# Four hardened units (securellm-vram-scheduler, -registry, -backend-manager, -gateway), an
# optional MCP unit, and a root oneshot (securellm-init) that creates the internal and admin
# tokens the units receive as systemd credentials. One TOML file is generated from the typed
# options below with `settings` merged over them (nulls dropped); the package checks it at build
# time (`--check-config`, as nixpkgs runs `nginx -t`), so a typo fails `nixos-rebuild`, not the
# service at boot. Secrets are paths to files outside the store, handed to the units with
# `LoadCredential`; nothing secret enters /nix/store.
#
# Evaluated on the development machine with nixpkgs' real module system and NixOS' real systemd
# unit types (../shared/nix-eval, scenarios in nix/tests/); the units have not been started on a
# NixOS machine there: the VM test (nix/tests/vm.nix, `nix flake check`) is where that happens.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    types
    ;
  cfg = config.services.securellm;
  toml = pkgs.formats.toml { };

  stateRoot = "/var/lib/securellm";
  unitName = short: "securellm-${short}";
  credDir = short: "/run/credentials/${unitName short}.service";

  # A TOML value that may also be null (null = "leave unset": dropped before rendering).
  tomlOrNull =
    let
      t = types.nullOr (
        types.oneOf [
          types.bool
          types.int
          types.float
          types.str
          types.path
          (types.attrsOf t)
          (types.listOf t)
        ]
      );
    in
    t // { description = "TOML value (null = unset)"; };
  dropNulls =
    v:
    if builtins.isAttrs v then
      lib.mapAttrs (_: dropNulls) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then
      map dropNulls (lib.filter (x: x != null) v)
    else
      v;

  # HOST:PORT → the port (for the firewall); [v6]:port too.
  portOf = addr: lib.toInt (lib.last (lib.splitString ":" addr));
  hostOf =
    addr:
    let
      parts = lib.splitString ":" addr;
    in
    lib.concatStringsSep ":" (lib.init parts);
  isLoopback =
    addr:
    let
      h = hostOf addr;
    in
    lib.hasPrefix "127." h || h == "[::1]" || h == "localhost";
  # Where a local client connects to a listener (0.0.0.0 / [::] mean "this host").
  connectAddr =
    addr:
    let
      h = hostOf addr;
    in
    if h == "0.0.0.0" || h == "" then
      "127.0.0.1:${toString (portOf addr)}"
    else if h == "[::]" then
      "[::1]:${toString (portOf addr)}"
    else
      addr;

  secretPath =
    types.str
    // {
      description = "absolute path to a secret file outside the Nix store (read by systemd as root, handed to the unit as a credential)";
    };

  listenOption =
    default: what:
    mkOption {
      type = types.str;
      inherit default;
      description = "${what} listen address (HOST:PORT).";
    };
  metricsOption =
    default:
    mkOption {
      type = types.str;
      inherit default;
      description = "Prometheus /metrics listen address (HOST:PORT), or \"off\".";
    };

  ollama = config.services.ollama or { };
  # Only with Ollama itself enabled (else the overrides below would make a bare ollama unit).
  ollamaEnabled = cfg.ollama.enable && (ollama.enable or false);
  ollamaModels = ollama.models or "${ollama.home or "/var/lib/ollama"}/models";
  ollamaGroup =
    let
      g = ollama.group or null;
      u = ollama.user or null;
    in
    if g != null then
      g
    else if u != null then
      u
    else
      "ollama";
  ollamaUrl = "http://${
    let
      h = ollama.host or "127.0.0.1";
    in
    if h == "0.0.0.0" || h == "" then "127.0.0.1" else h
  }:${toString (ollama.port or 11434)}";

  # A unit can be fenced to loopback (IPAddressDeny=any, IPAddressAllow=localhost) only when every
  # address it listens on or connects to is loopback, as rendered (the `settings` escape hatch
  # included): listeners, metrics, peers, the OTLP collector, engines, cloud upstreams.
  localAddr = a: a == null || a == "off" || isLoopback a;
  localUrl =
    u:
    u == null
    || lib.any (p: lib.hasPrefix p u) [
      "http://127."
      "http://localhost"
      "http://[::1]"
    ];
  otlpLocal = localUrl (finalSettings.telemetry.otlp_endpoint or null);
  loopbackOnlyFor =
    section: peers:
    let
      s = finalSettings.${section} or { };
    in
    otlpLocal
    && lib.all localAddr (
      [
        (s.listen or null)
        (s.metrics_listen or null)
        (s.http_listen or null)
      ]
      ++ map (p: s.${p} or null) peers
    );

  nvidia = cfg.gpu.nvidia;
  llamaCpp = cfg.llamaCppPackage;

  modelRootStrings = map toString cfg.modelRoots ++ lib.optional ollamaEnabled ollamaModels;

  # ---------------------------------------------------------------------------------------------
  # The configuration file: typed options, then `settings` over them.
  gw = cfg.gateway;
  upstreamCred = name: "upstream-${name}-key";
  typedSettings = {
    scheduler = {
      inherit (cfg.scheduler) listen;
      metrics_listen = cfg.scheduler.metricsListen;
      inventory =
        if cfg.gpu.simulate != [ ] then
          "simulated"
        else if nvidia then
          "nvml"
        else
          "auto";
      simulate_gpus = if cfg.gpu.simulate == [ ] then null else cfg.gpu.simulate;
      inherit (cfg.gpu) reserve;
    };
    registry = {
      inherit (cfg.registry) listen;
      metrics_listen = cfg.registry.metricsListen;
    };
    models = {
      roots = modelRootStrings;
      aliases = if cfg.modelAliases == { } then null else cfg.modelAliases;
    };
    backend = {
      inherit (cfg.backendManager) listen;
      metrics_listen = cfg.backendManager.metricsListen;
      scheduler = connectAddr cfg.scheduler.listen;
      registry = connectAddr cfg.registry.listen;
      llama_server = "${lib.getBin llamaCpp}/bin/llama-server";
      defaults = {
        idle_ttl_ms = cfg.backendManager.idleTtlMs;
      };
      models = if cfg.models == { } then null else cfg.models;
      ollama = if ollamaEnabled then { url = ollamaUrl; } else null;
    };
    gateway = {
      inherit (gw) listen;
      http_listen = gw.httpListen;
      metrics_listen = gw.metricsListen;
      backend = connectAddr cfg.backendManager.listen;
      registry = connectAddr cfg.registry.listen;
      scheduler = connectAddr cfg.scheduler.listen;
      bootstrap_key_file = "${stateRoot}/gateway/api-key";
      admin_token_file = "${credDir "gateway"}/admin-token";
      tls =
        if gw.tls == null then
          null
        else
          {
            cert_file = "${credDir "gateway"}/tls-cert";
            key_file = "${credDir "gateway"}/tls-key";
          };
      jwt =
        if gw.jwt == null then
          null
        else
          {
            inherit (gw.jwt) algorithm issuer audience;
            default_models = gw.jwt.defaultModels;
            secret_file = if gw.jwt.secretFile == null then null else "${credDir "gateway"}/jwt-secret";
            public_key_file =
              if gw.jwt.publicKeyFile == null then null else "${credDir "gateway"}/jwt-public-key";
          };
      upstreams =
        if gw.upstreams == { } then
          null
        else
          lib.mapAttrs (name: u: {
            base_url = u.baseUrl;
            inherit (u) models redaction;
            api_key_file = if u.apiKeyFile == null then null else "${credDir "gateway"}/${upstreamCred name}";
          }) gw.upstreams;
      max_body = gw.limits.maxBody;
      request_timeout_ms = gw.limits.requestTimeoutMs;
      max_inflight_per_key = gw.limits.maxInflightPerKey;
      max_inflight_per_address = gw.limits.maxInflightPerAddress;
      max_tokens_cap = gw.limits.maxTokensCap;
      audit_mode = gw.auditMode;
    };
  };
  finalSettings = dropNulls (lib.recursiveUpdate typedSettings cfg.settings);
  rawConfigFile = toml.generate "securellm.toml" finalSettings;
  # The file the units read: the generated one, checked by each enabled service's own parser at
  # build time.
  configFile =
    if !cfg.checkConfig then
      rawConfigFile
    else
      pkgs.runCommand "securellm-checked.toml" { preferLocalBuild = true; } ''
        ${lib.concatMapStringsSep "\n" (bin: "${cfg.package}/bin/${bin} --check-config ${rawConfigFile}") (
          lib.optional cfg.scheduler.enable "vram-scheduler"
          ++ lib.optional cfg.registry.enable "registry"
          ++ lib.optional cfg.backendManager.enable "backend-manager"
          ++ lib.optional gw.enable "securellm-gateway"
        )}
        cp ${rawConfigFile} $out
      '';

  # ---------------------------------------------------------------------------------------------
  # Units.
  gpuDevices = [
    "char-nvidiactl rw"
    "char-nvidia-frontend rw"
    "char-nvidia-uvm rw"
    "char-nvidia-caps rw"
    "char-nvidia-caps-imex-channels rw"
  ];

  # The sandbox every unit gets; `gpu` units keep the NVIDIA device nodes, `spawns` units run
  # engines (llama-server) whose needs are wider (e.g. CUDA's W+X memory).
  hardening =
    {
      gpu ? false,
      spawns ? false,
      loopbackOnly ? true,
    }:
    {
      DynamicUser = true;
      UMask = "0077";
      NoNewPrivileges = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      PrivateDevices = !gpu;
      DevicePolicy = "closed";
      PrivateUsers = !gpu;
      PrivateMounts = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectClock = true;
      ProtectHostname = true;
      ProtectProc = "invisible";
      RestrictAddressFamilies = [
        "AF_INET"
        "AF_INET6"
        "AF_UNIX"
      ]
      ++ lib.optional gpu "AF_NETLINK";
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      RemoveIPC = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = !(spawns && cfg.gpu.cuda);
      SystemCallArchitectures = "native";
      SystemCallFilter = [
        "@system-service"
        "~@privileged"
      ]
      ++ lib.optional (!spawns) "~@resources";
      SystemCallErrorNumber = "EPERM";
      CapabilityBoundingSet = "";
      AmbientCapabilities = "";
      KeyringMode = "private";
      NotifyAccess = "none";
    }
    # NVML reads /proc/driver/nvidia; engines read /proc/cpuinfo and /proc/meminfo.
    // lib.optionalAttrs (!spawns && !gpu) { ProcSubset = "pid"; }
    // lib.optionalAttrs loopbackOnly {
      IPAddressDeny = "any";
      IPAddressAllow = "localhost";
    }
    // lib.optionalAttrs gpu {
      DeviceAllow = gpuDevices;
      SupplementaryGroups = [
        "video"
        "render"
      ];
    };

  unit =
    short:
    {
      binary,
      description,
      # /var/lib/securellm/<state>: the layout `make run` uses, which the CLI knows.
      state ? short,
      deps ? [ ],
      args ? [ ],
      credentials ? { },
      serviceConfig ? { },
      environment ? { },
    }:
    let
      creds = {
        internal-token = "${stateRoot}/internal-token";
      }
      // credentials;
    in
    {
      inherit description;
      wantedBy = [ "multi-user.target" ];
      after = [
        "network.target"
        "securellm-init.service"
      ]
      ++ map (d: "${unitName d}.service") deps;
      # `wants`, not `requires`: restarting the scheduler must not restart the manager (and its
      # engines) or the gateway; the manager re-attaches its leases instead.
      requires = [ "securellm-init.service" ];
      wants = map (d: "${unitName d}.service") deps;
      restartTriggers = [ configFile ];
      environment = {
        RUST_LOG = cfg.logLevel;
      }
      // environment;
      serviceConfig = {
        Type = "exec";
        ExecStart = lib.escapeShellArgs (
          [
            "${cfg.package}/bin/${binary}"
            "--config"
            "${configFile}"
            "--data-dir"
            "${stateRoot}/${state}"
            "--internal-token-file"
            "${credDir short}/internal-token"
          ]
          ++ args
        );
        StateDirectory = "securellm/${state}";
        StateDirectoryMode = "0700";
        LoadCredential = lib.mapAttrsToList (n: p: "${n}:${p}") creds;
        Restart = "on-failure";
        RestartSec = 2;
        TimeoutStopSec = 20;
      }
      // serviceConfig;
    };

  homeRoots = lib.any (r: lib.hasPrefix "/home/" r || lib.hasPrefix "/root/" r) modelRootStrings;
  modelAccess = {
    # Roots under /home are reachable read-only (ProtectHome would hide them).
    ProtectHome = if homeRoots then "read-only" else true;
    # Missing roots never fail the unit ("-"); the registry reports them.
    ReadOnlyPaths = map (r: "-${r}") modelRootStrings;
    SupplementaryGroups = cfg.modelGroups ++ lib.optional ollamaEnabled ollamaGroup;
  };
  nvmlEnv = lib.optionalAttrs nvidia { LD_LIBRARY_PATH = "/run/opengl-driver/lib"; };

  gatewayCredentials =
    {
      admin-token = "${stateRoot}/admin-token";
    }
    // lib.optionalAttrs (gw.tls != null) {
      tls-cert = gw.tls.certFile;
      tls-key = gw.tls.keyFile;
    }
    // lib.optionalAttrs (gw.jwt != null && gw.jwt.secretFile != null) {
      jwt-secret = gw.jwt.secretFile;
    }
    // lib.optionalAttrs (gw.jwt != null && gw.jwt.publicKeyFile != null) {
      jwt-public-key = gw.jwt.publicKeyFile;
    }
    // lib.mapAttrs' (name: u: lib.nameValuePair (upstreamCred name) u.apiKeyFile) (
      lib.filterAttrs (_: u: u.apiKeyFile != null) gw.upstreams
    );
  secretFiles = lib.attrValues gatewayCredentials ++ lib.optional (cfg.mcp.apiKeyFile != null) cfg.mcp.apiKeyFile;

  stackFile = ''
    # Written by the NixOS module (services.securellm): what `securellm` and `securellm-mcp` read
    # when no flag or environment variable says otherwise. Root can read the tokens it names.
    SECURELLM_DATA_DIR=${stateRoot}
    SECURELLM_INTERNAL_TOKEN_FILE=${stateRoot}/internal-token
    SECURELLM_SCHEDULER=${connectAddr finalSettings.scheduler.listen}
    SECURELLM_REGISTRY=${connectAddr finalSettings.registry.listen}
    SECURELLM_BACKEND=${connectAddr finalSettings.backend.listen}
    SECURELLM_GATEWAY=${connectAddr finalSettings.gateway.listen}
    SECURELLM_GATEWAY_HTTP=${connectAddr finalSettings.gateway.http_listen}
  ''
  + lib.concatStrings (
    lib.mapAttrsToList (k: v: lib.optionalString (v != "off") "${k}=${connectAddr v}\n") {
      SECURELLM_SCHEDULER_METRICS = finalSettings.scheduler.metrics_listen;
      SECURELLM_REGISTRY_METRICS = finalSettings.registry.metrics_listen;
      SECURELLM_BACKEND_METRICS = finalSettings.backend.metrics_listen;
      SECURELLM_GATEWAY_METRICS = finalSettings.gateway.metrics_listen;
    }
  );

  initScript = pkgs.writeShellScript "securellm-init" ''
    set -eu
    umask 077
    for name in internal-token admin-token; do
      f=${stateRoot}/$name
      if [ ! -s "$f" ]; then
        ${pkgs.coreutils}/bin/od -An -tx1 -N32 /dev/urandom | ${pkgs.coreutils}/bin/tr -d ' \n' > "$f.new"
        ${pkgs.coreutils}/bin/mv "$f.new" "$f"
      fi
      ${pkgs.coreutils}/bin/chmod 0600 "$f"
    done
  '';
in
{
  options.services.securellm = {
    enable = mkEnableOption "SecureLLM: the VRAM scheduler, model registry, backend manager and OpenAI-compatible gateway";

    package = mkOption {
      type = types.package;
      default = pkgs.securellm or (pkgs.callPackage ./package.nix { });
      defaultText = lib.literalExpression "pkgs.securellm (from the flake's overlay), else built from this source tree";
      description = "The package providing vram-scheduler, registry, backend-manager, securellm-gateway, securellm and securellm-mcp.";
    };

    llamaCppPackage = mkOption {
      type = types.package;
      default =
        if cfg.gpu.cuda && !(pkgs.config.cudaSupport or false) then
          pkgs.llama-cpp.override { cudaSupport = true; }
        else
          pkgs.llama-cpp;
      defaultText = lib.literalExpression "pkgs.llama-cpp, built with CUDA when services.securellm.gpu.cuda";
      description = "The llama.cpp package whose llama-server the backend manager starts.";
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      example = "info,securellm_gateway=debug";
      description = "RUST_LOG for every unit.";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = "Run each service's `--check-config` on the generated file at build time, so a mistake fails the build with the service's own message.";
    };

    modelRoots = mkOption {
      # Strings, not paths: a path literal in a flake would become a copy in the store.
      type = types.listOf types.str;
      default = [ ];
      example = [ "/srv/models" ];
      description = "Directories the registry scans (GGUF, split GGUF, Ollama store, safetensors). A missing directory does not fail a unit. Not copied to the store.";
    };

    modelGroups = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "models" ];
      description = "Extra groups of the registry and backend manager, for model directories that are not world-readable.";
    };

    modelAliases = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        chat = "llama-3.2-3b-instruct-q4_k_m";
      };
      description = "Model name aliases (`[models] aliases`).";
    };

    models = mkOption {
      type = types.attrsOf (
        types.submodule {
          freeformType = types.attrsOf tomlOrNull;
          options = {
            context = mkOption {
              type = types.nullOr types.ints.positive;
              default = null;
              description = "Context length (tokens).";
            };
            priority = mkOption {
              type = types.nullOr types.int;
              default = null;
              description = "Lease priority (higher may evict lower).";
            };
            idle_ttl_ms = mkOption {
              type = types.nullOr types.ints.unsigned;
              default = null;
              description = "Unload after this long idle.";
            };
            gpu_layers = mkOption {
              type = types.nullOr types.ints.unsigned;
              default = null;
              description = "Layers offloaded to the GPU (unset: all that fit).";
            };
          };
        }
      );
      default = { };
      example = {
        "qwen2.5-coder-7b" = {
          context = 16384;
          priority = 10;
        };
      };
      description = "Per-model settings by registry name, alias or id (`[backend.models.<name>]`; any other key of that table is accepted as is).";
    };

    gpu = {
      nvidia = mkOption {
        type = types.bool;
        default =
          builtins.elem "nvidia" (config.services.xserver.videoDrivers or [ ])
          || (config.hardware.nvidia.datacenter.enable or false);
        defaultText = lib.literalExpression ''elem "nvidia" config.services.xserver.videoDrivers || config.hardware.nvidia.datacenter.enable'';
        description = "This machine has NVIDIA GPUs: the scheduler uses NVML (inventory = nvml, so a missing driver library is a start-up error rather than a silent zero-GPU box), finds it in /run/opengl-driver/lib, and the scheduler and backend manager may open /dev/nvidia*.";
      };
      cuda = mkOption {
        type = types.bool;
        default = pkgs.config.cudaSupport or false;
        defaultText = lib.literalExpression "nixpkgs.config.cudaSupport";
        description = "Build llama-server with CUDA (and allow the W+X memory CUDA needs in the backend manager's sandbox).";
      };
      reserve = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "512MiB";
        description = "GPU memory per GPU that is never granted (`[scheduler] reserve`).";
      };
      simulate = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "24GiB" ];
        description = "Simulated GPUs (sizes) instead of real ones: for machines without a GPU and for tests.";
      };
    };

    scheduler = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run the VRAM scheduler.";
      };
      listen = listenOption "127.0.0.1:50051" "gRPC";
      metricsListen = metricsOption "127.0.0.1:9451";
    };
    registry = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run the model registry.";
      };
      listen = listenOption "127.0.0.1:50052" "gRPC";
      metricsListen = metricsOption "127.0.0.1:9452";
    };
    backendManager = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run the backend manager (llama-server instances behind GPU leases).";
      };
      listen = listenOption "127.0.0.1:50053" "gRPC";
      metricsListen = metricsOption "127.0.0.1:9453";
      idleTtlMs = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        example = 300000;
        description = "Unload a model after this long idle (default: the backend manager's).";
      };
    };

    gateway = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run the gateway (the OpenAI-compatible HTTP API and the admin gRPC API).";
      };
      listen = listenOption "127.0.0.1:50054" "gRPC (Gateway, GatewayAdmin)";
      httpListen = listenOption "127.0.0.1:8088" "OpenAI-compatible HTTP";
      metricsListen = metricsOption "127.0.0.1:9454";
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the gateway's HTTP port (only that one) in the firewall.";
      };
      auditMode = mkOption {
        type = types.enum [
          "async"
          "sync"
        ];
        default = "async";
        description = "`sync`: fail-closed, no 2xx before the audit row is committed.";
      };
      tls = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              certFile = mkOption {
                type = secretPath;
                description = "PEM certificate chain.";
              };
              keyFile = mkOption {
                type = secretPath;
                description = "PEM private key (never copied to the store).";
              };
            };
          }
        );
        default = null;
        description = "Serve HTTP and gRPC over TLS.";
      };
      jwt = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              algorithm = mkOption {
                type = types.enum [
                  "HS256"
                  "RS256"
                  "EdDSA"
                ];
                description = "Signature algorithm.";
              };
              secretFile = mkOption {
                type = types.nullOr secretPath;
                default = null;
                description = "HS256 shared secret file.";
              };
              publicKeyFile = mkOption {
                type = types.nullOr secretPath;
                default = null;
                description = "RS256 / EdDSA PEM public key file.";
              };
              issuer = mkOption {
                type = types.nullOr types.str;
                default = null;
                description = "Required `iss`.";
              };
              audience = mkOption {
                type = types.nullOr types.str;
                default = null;
                description = "Required `aud`.";
              };
              defaultModels = mkOption {
                type = types.listOf types.str;
                default = [ ];
                description = "Model patterns for tokens without a `models` claim.";
              };
            };
          }
        );
        default = null;
        description = "Accept JWT bearer tokens besides API keys.";
      };
      upstreams = mkOption {
        type = types.attrsOf (
          types.submodule {
            options = {
              baseUrl = mkOption {
                type = types.str;
                example = "https://api.openai.com/v1";
                description = "The upstream's OpenAI-compatible base URL.";
              };
              models = mkOption {
                type = types.listOf types.str;
                example = [ "gpt-4o*" ];
                description = "Model names or `*` patterns served by it.";
              };
              apiKeyFile = mkOption {
                type = types.nullOr secretPath;
                default = null;
                description = "File holding the API key (never copied to the store).";
              };
              redaction = mkOption {
                type = types.enum [
                  "redact"
                  "block"
                  "allow"
                ];
                default = "redact";
                description = "What to do with secrets found in prompts sent to it.";
              };
            };
          }
        );
        default = { };
        description = "Cloud (or other OpenAI-compatible) upstreams.";
      };
      limits = {
        maxBody = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "8MiB";
          description = "Largest request body.";
        };
        requestTimeoutMs = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Whole-request time limit, load included.";
        };
        maxInflightPerKey = mkOption {
          type = types.nullOr types.ints.unsigned;
          default = null;
          description = "Requests in progress per API key (0 = no cap).";
        };
        maxInflightPerAddress = mkOption {
          type = types.nullOr types.ints.unsigned;
          default = null;
          description = "Requests in progress per client address (0 = no cap).";
        };
        maxTokensCap = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "The largest max_tokens a request may ask for.";
        };
      };
    };

    mcp = {
      enable = mkEnableOption "the MCP server as a unit (streamable HTTP on a loopback address, at /mcp). It holds the internal and admin tokens and has no authentication of its own: any local user can use its tools (status, load/unload, audit). Leave it off on shared machines and run `securellm-mcp` over stdio from the editor instead";
      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:8765";
        description = "Loopback address of the MCP endpoint (http://ADDR/mcp).";
      };
      apiKeyFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/keys/securellm-mcp-key";
        description = "A gateway API key for the `chat` tool (create one scoped to the models assistants may use with `securellm keys create`); null: the tool has no key. The endpoint itself has no authentication: every local user can reach it, so do not hand it the bootstrap key.";
      };
    };

    ollama.enable = mkOption {
      type = types.bool;
      default = config.services.ollama.enable or false;
      defaultText = lib.literalExpression "config.services.ollama.enable";
      description = "Serve Ollama's store: the registry and backend manager read it (group and path as nixpkgs' ollama module lays them out) and `[backend.ollama] url` points at the daemon.";
    };

    settings = mkOption {
      type = types.attrsOf tomlOrNull;
      default = { };
      example = {
        scheduler.max_wait_ms = 60000;
        gateway.redact_patterns.internal_ticket = "TICKET-[0-9]{6}";
      };
      description = "The TOML configuration ([scheduler], [registry], [models], [backend], [gateway], [telemetry]; see the README), merged over what the options above generate. null removes a key. Checked at build time.";
    };

    configFile = mkOption {
      type = types.package;
      readOnly = true;
      internal = true;
      description = "The configuration file the units read (checked at build time when checkConfig).";
    };

    finalSettings = mkOption {
      type = types.attrsOf types.anything;
      readOnly = true;
      internal = true;
      description = "The configuration as rendered (for tests and other modules).";
    };
  };

  config = mkIf cfg.enable {
    services.securellm.finalSettings = finalSettings;
    services.securellm.configFile = configFile;

    assertions = [
      {
        assertion = lib.all (f: lib.hasPrefix "/" f && !(lib.hasPrefix builtins.storeDir f)) secretFiles;
        message = "services.securellm: secret files must be absolute paths outside the Nix store (they are read by systemd at start, not copied): ${toString secretFiles}";
      }
      {
        assertion = lib.all (lib.hasPrefix "/") modelRootStrings;
        message = "services.securellm.modelRoots must be absolute paths: ${toString modelRootStrings}";
      }
      {
        assertion = isLoopback cfg.mcp.listen || !cfg.mcp.enable;
        message = "services.securellm.mcp.listen must be a loopback address (the MCP endpoint has no authentication of its own).";
      }
      {
        assertion = !(nvidia && cfg.gpu.simulate != [ ]);
        message = "services.securellm: gpu.nvidia and gpu.simulate are exclusive.";
      }
      {
        assertion = cfg.gateway.jwt == null || cfg.gateway.jwt.algorithm == "HS256" || cfg.gateway.jwt.publicKeyFile != null;
        message = "services.securellm.gateway.jwt: RS256 and EdDSA need publicKeyFile.";
      }
    ];

    environment.systemPackages = [ cfg.package ];
    environment.etc."securellm/stack".text = stackFile;

    networking.firewall.allowedTCPPorts = lib.optional (gw.enable && gw.openFirewall) (portOf gw.httpListen);

    systemd.services = lib.mkMerge [
      {
        securellm-init = {
          description = "SecureLLM: create the internal and admin tokens";
          wantedBy = [ "multi-user.target" ];
          # Root (it writes root-owned files), otherwise the same sandbox: no capabilities, no
          # network, no devices.
          serviceConfig = hardening { } // {
            DynamicUser = false;
            PrivateNetwork = true;
            RestrictAddressFamilies = "none";
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${initScript}";
            StateDirectory = "securellm";
            StateDirectoryMode = "0755";
          };
        };
      }
      (mkIf cfg.scheduler.enable {
        securellm-vram-scheduler = unit "vram-scheduler" {
          binary = "vram-scheduler";
          state = "scheduler";
          description = "SecureLLM VRAM scheduler (the GPU memory authority)";
          environment = nvmlEnv;
          serviceConfig = hardening {
            gpu = nvidia;
            loopbackOnly = loopbackOnlyFor "scheduler" [ ];
          };
        };
      })
      (mkIf cfg.registry.enable {
        securellm-registry = unit "registry" {
          binary = "registry";
          description = "SecureLLM model registry";
          serviceConfig = hardening { loopbackOnly = loopbackOnlyFor "registry" [ ]; } // modelAccess;
        };
      })
      (mkIf cfg.backendManager.enable {
        securellm-backend-manager = unit "backend-manager" {
          binary = "backend-manager";
          state = "backend";
          description = "SecureLLM backend manager (llama-server instances behind GPU leases)";
          deps = lib.optional cfg.scheduler.enable "vram-scheduler" ++ lib.optional cfg.registry.enable "registry";
          environment = nvmlEnv;
          serviceConfig =
            hardening {
              gpu = nvidia;
              spawns = true;
              # vLLM / TGI may live on other hosts.
              loopbackOnly =
                loopbackOnlyFor "backend" [
                  "scheduler"
                  "registry"
                ]
                && localUrl (finalSettings.backend.ollama.url or null)
                && !(finalSettings.backend ? vllm)
                && !(finalSettings.backend ? tgi);
            }
            // modelAccess
            // {
              SupplementaryGroups =
                modelAccess.SupplementaryGroups
                ++ lib.optionals nvidia [
                  "video"
                  "render"
                ];
              # The manager stops its llama-server children itself (SIGTERM, then SIGKILL);
              # systemd kills what is left after the grace.
              KillMode = "mixed";
            };
        };
      })
      (mkIf gw.enable {
        securellm-gateway = unit "gateway" {
          binary = "securellm-gateway";
          description = "SecureLLM gateway (OpenAI-compatible API)";
          deps = lib.optional cfg.backendManager.enable "backend-manager";
          credentials = gatewayCredentials;
          serviceConfig = hardening {
            loopbackOnly =
              loopbackOnlyFor "gateway" [
                "backend"
                "registry"
              ]
              && (finalSettings.gateway.upstreams or { }) == { };
          };
        };
      })
      (mkIf cfg.mcp.enable {
        securellm-mcp = {
          description = "SecureLLM MCP server (streamable HTTP on loopback)";
          wantedBy = [ "multi-user.target" ];
          after = [
            "securellm-init.service"
            "securellm-gateway.service"
          ];
          wants = [ "securellm-gateway.service" ];
          environment.RUST_LOG = cfg.logLevel;
          serviceConfig = hardening { } // {
            Type = "exec";
            ExecStart = lib.escapeShellArgs (
              [
                "${cfg.package}/bin/securellm-mcp"
                "--http"
                cfg.mcp.listen
                "--scheduler"
                (connectAddr finalSettings.scheduler.listen)
                "--registry"
                (connectAddr finalSettings.registry.listen)
                "--backend"
                (connectAddr finalSettings.backend.listen)
                "--gateway"
                (connectAddr finalSettings.gateway.listen)
                "--gateway-http"
                (connectAddr finalSettings.gateway.http_listen)
                "--internal-token-file"
                "${credDir "mcp"}/internal-token"
                "--admin-token-file"
                "${credDir "mcp"}/admin-token"
              ]
              ++ lib.optionals (cfg.mcp.apiKeyFile != null) [
                "--api-key-file"
                "${credDir "mcp"}/api-key"
              ]
            );
            LoadCredential = [
              "internal-token:${stateRoot}/internal-token"
              "admin-token:${stateRoot}/admin-token"
            ]
            ++ lib.optional (cfg.mcp.apiKeyFile != null) "api-key:${cfg.mcp.apiKeyFile}";
            # On first boot the bootstrap key appears once the gateway has started.
            Restart = "on-failure";
            RestartSec = 3;
          };
        };
      })
      # Ollama's store readable by our units. nixpkgs' module runs Ollama as a DynamicUser even
      # when `user` is set, which puts /var/lib/ollama under /var/lib/private (closed to every
      # other unit); a static user and group, and new files group-readable, open it to the
      # `ollama` group our units join. Files written earlier under umask 0077 need a one-time
      # `chmod -R g+rX /var/lib/ollama` (README, "NixOS").
      (mkIf ollamaEnabled {
        ollama.serviceConfig = {
          DynamicUser = lib.mkForce false;
          UMask = lib.mkOverride 75 "0027";
        };
      })
    ];

    # The static user and group the override above runs Ollama as.
    services.ollama = mkIf ollamaEnabled {
      user = lib.mkDefault "ollama";
      group = lib.mkDefault "ollama";
    };
  };
}
