# Extra stand-ins for the evaluation scenarios: llama-cpp's `override` (nixpkgs builds
# llama-server with CUDA through `llama-cpp.override { cudaSupport = true; }`) and
# `writeShellScript` (a text file in the store, as in nixpkgs, made executable there).
{ lib, pkgs }:
{
  writeShellScript = name: text: pkgs.writeText name text;
  llama-cpp = pkgs.llama-cpp // {
    override =
      args:
      pkgs.mkStub (if args.cudaSupport or false then "llama-cpp-cuda-5760" else "llama-cpp-5760") {
        meta.mainProgram = "llama";
      };
  };
}
