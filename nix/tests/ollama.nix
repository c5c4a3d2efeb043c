# Ollama beside SecureLLM: its store is scanned and served through the daemon.
{
  services.ollama.enable = true;
  services.ollama.port = 11500;
  services.securellm = {
    enable = true;
    modelRoots = [ "/srv/models" ];
  };
}
