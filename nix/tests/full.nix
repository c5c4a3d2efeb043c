# Everything a team sets: the gateway on the network with TLS, JWT, a cloud upstream, limits,
# secrets from files outside the store, the MCP unit, and the escape hatch.
{
  services.securellm = {
    enable = true;
    modelRoots = [ "/srv/models" ];
    modelGroups = [ "models" ];
    modelAliases.chat = "tiny";
    gpu.simulate = [ "24GiB" ];
    gateway = {
      httpListen = "0.0.0.0:8443";
      openFirewall = true;
      auditMode = "sync";
      tls = {
        certFile = "/run/keys/securellm/tls.crt";
        keyFile = "/run/keys/securellm/tls.key";
      };
      jwt = {
        algorithm = "EdDSA";
        publicKeyFile = "/run/keys/securellm/jwt.pub";
        issuer = "https://sso.example.org";
        audience = "securellm";
        defaultModels = [ "chat" ];
      };
      upstreams.openai = {
        baseUrl = "https://api.openai.com/v1";
        models = [ "gpt-4o*" ];
        apiKeyFile = "/run/keys/securellm/openai";
      };
      limits = {
        maxBody = "8MiB";
        maxInflightPerKey = 32;
        maxTokensCap = 4096;
      };
    };
    mcp.enable = true;
    settings = {
      scheduler.max_wait_ms = 60000;
      gateway.redact_patterns.ticket = "TICKET-[0-9]{6}";
      telemetry.otlp_endpoint = "http://127.0.0.1:4317";
    };
  };
}
