# The SecureLLM workspace as one package: vram-scheduler, registry, backend-manager,
# securellm-gateway, securellm (CLI), securellm-mcp and securellm-bench.
#
# No network in the build: dependencies come from Cargo.lock (`cargoLock.lockFile`), protobuf is
# compiled by protox (pure Rust, no protoc), SQLite is bundled by libsqlite3-sys, TLS is rustls
# (no OpenSSL), NVML is loaded at run time (libnvidia-ml.so.1, from /run/opengl-driver/lib on
# NixOS). The checks run the unit tests of the libraries and binaries; the integration and
# end-to-end tests (they start llama-server, Python's `openai` client, Docker, Nix, promtool)
# run in `make test`, not in the sandbox.
#
# Not built on the development machine (no Nix store there): `nix build` on a machine with Nix.
{
  lib,
  rustPlatform,
}:

let
  fs = lib.fileset;
  root = ../.;
in
rustPlatform.buildRustPackage {
  pname = "securellm";
  version = "0.1.0";

  src = fs.toSource {
    inherit root;
    fileset = fs.unions [
      (root + "/Cargo.toml")
      (root + "/Cargo.lock")
      (root + "/proto")
      (root + "/shared")
      (root + "/services")
      (root + "/cli")
      (root + "/integrations/mcp")
      (root + "/bench")
      (root + "/tests/e2e")
      (root + "/deploy")
      (root + "/docs")
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The release binaries of the workspace (the bench program included: `securellm-bench`).
  cargoBuildFlags = [ "--workspace" ];

  # Unit tests only (`--lib --bins`): the integration tests (each crate's tests/ and tests/e2e)
  # start llama-server, Python's `openai` client, promtool, Docker or Nix, none of which is in the
  # build sandbox. Unit tests bind loopback sockets at most, which the Linux sandbox allows.
  cargoTestFlags = [
    "--workspace"
    "--lib"
    "--bins"
  ];

  meta = {
    description = "Local-first, secure LLM serving control plane: VRAM leases, model registry, llama-server instances, an OpenAI-compatible gateway";
    homepage = "https://github.com/securellm/securellm";
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "securellm";
    platforms = lib.platforms.linux;
  };
}
