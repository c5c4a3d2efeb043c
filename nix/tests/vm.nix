# NixOS VM test: the module on a machine with a simulated GPU and a tiny generated model.
# Waits for the units, calls the OpenAI endpoint with curl, runs `securellm status` and
# `securellm audit verify`, restarts the scheduler and checks that the loaded model's lease was
# re-attached (the model answers without a reload and the scheduler shows its lease).
#
# `nix flake check` (or `nix build .#checks.x86_64-linux.vm`) on a machine with Nix and KVM.
# NOT run on the development machine (no Nix store, no KVM there).
{ pkgs, module }:

pkgs.testers.runNixOSTest {
  name = "securellm";

  nodes.machine =
    { config, pkgs, ... }:
    {
      imports = [ module ];
      virtualisation.memorySize = 3072;
      virtualisation.cores = 2;

      services.securellm = {
        enable = true;
        modelRoots = [ "/srv/models" ];
        gpu.simulate = [ "8GiB" ];
        backendManager.idleTtlMs = 600000;
        mcp.enable = true;
      };

      # The tiny model, written before the registry starts (no download in a VM test).
      systemd.services.securellm-test-model = {
        wantedBy = [ "multi-user.target" ];
        before = [ "securellm-registry.service" ];
        requiredBy = [ "securellm-registry.service" ];
        serviceConfig.Type = "oneshot";
        script = ''
          mkdir -p /srv/models
          ${config.services.securellm.package}/bin/securellm demo-model /srv/models/tiny.gguf
          chmod -R a+rX /srv/models
        '';
      };

      environment.systemPackages = [ pkgs.curl ];
    };

  testScript = ''
    import json

    machine.wait_for_unit("securellm-init.service")
    for unit in ["vram-scheduler", "registry", "backend-manager", "gateway", "mcp"]:
        machine.wait_for_unit(f"securellm-{unit}.service")
    machine.wait_for_open_port(8088)
    machine.wait_until_succeeds("test -s /var/lib/securellm/gateway/api-key")
    key = machine.succeed("cat /var/lib/securellm/gateway/api-key").strip()
    auth = f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json'"

    models = json.loads(machine.wait_until_succeeds(
        f"curl -sf {auth} http://127.0.0.1:8088/v1/models | grep tiny"
    ))
    assert any(m["id"] == "tiny" for m in models["data"]), models

    def chat():
        body = json.dumps({"model": "tiny", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello"}]})
        out = json.loads(machine.succeed(
            f"curl -sf {auth} http://127.0.0.1:8088/v1/chat/completions -d '{body}'"))
        assert out["choices"][0]["message"]["content"] is not None, out
        return out

    chat()
    # A wrong key gets the gateway's 401, not an answer.
    machine.fail("curl -sf -H 'Authorization: Bearer sk-wrong' http://127.0.0.1:8088/v1/models")

    # The CLI (root) finds the stack through /etc/securellm/stack and the admin token.
    status = machine.succeed("securellm status")
    print(status)
    for service in ["vram-scheduler", "registry", "backend-manager", "gateway"]:
        assert service in status, status
    machine.succeed("securellm audit verify")
    machine.succeed("securellm vram | grep -i tiny")

    # Restart the scheduler: the manager re-attaches its lease, the model answers without a
    # reload (its llama-server keeps its PID) and the scheduler shows the lease again.
    pid = machine.succeed("pgrep -f llama-server").strip()
    assert pid, "no llama-server runs"
    machine.systemctl("restart securellm-vram-scheduler.service")
    machine.wait_for_unit("securellm-vram-scheduler.service")
    machine.wait_until_succeeds("securellm vram | grep -i tiny")
    chat()
    assert machine.succeed("pgrep -f llama-server").strip() == pid, "the model was reloaded"
    # The gateway and the backend manager were not restarted with the scheduler.
    machine.succeed("securellm ps | grep -q tiny")

    # The units' sandbox, as systemd rates it on a real NixOS (printed for the log).
    print(machine.succeed("systemd-analyze security securellm-gateway.service | tail -1"))

    # The MCP endpoint answers on loopback.
    machine.wait_until_succeeds(
        "curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:8765/mcp "
        "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' "
        "-d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-03-26\",\"capabilities\":{},\"clientInfo\":{\"name\":\"vm-test\",\"version\":\"1\"}}}' "
        "| grep -q 200"
    )
  '';
}
