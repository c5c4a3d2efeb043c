{
  description = "SecureLLM: a local-first, secure LLM serving control plane (VRAM leases, model registry, llama-server instances, an OpenAI-compatible gateway)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = import ./nix/overlay.nix;

      # `imports = [ securellm.nixosModules.default ]; services.securellm.enable = true;`
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.securellm.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      packages = forAll (pkgs: rec {
        securellm = pkgs.callPackage ./nix/package.nix { };
        default = securellm;
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.cargo-nextest
            pkgs.llama-cpp
            pkgs.prometheus
            pkgs.nix
            (pkgs.python3.withPackages (p: [
              p.openai
              p.gguf
              p.pyyaml
            ]))
          ];
          LLAMA_SERVER = "${pkgs.llama-cpp}/bin/llama-server";
        };
      });

      checks = forAll (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # A NixOS VM with the module, a simulated GPU and a tiny generated model (needs KVM).
        vm = import ./nix/tests/vm.nix {
          inherit pkgs;
          module = self.nixosModules.default;
        };
      });

      formatter = forAll (pkgs: pkgs.nixfmt);
    };
}
