# A CUDA box: NVIDIA declared the NixOS way, models on disk, a reserve, per-model settings, and
# `null` in settings removing a key (evaluated with cudaSupport = true).
{
  services.xserver.videoDrivers = [ "nvidia" ];
  services.securellm = {
    enable = true;
    modelRoots = [
      "/srv/models"
      "/data/missing-is-fine"
    ];
    gpu.reserve = "512MiB";
    backendManager.idleTtlMs = 300000;
    models."qwen2.5-coder-7b" = {
      context = 16384;
      priority = 10;
      flash_attention = true;
    };
    settings.gateway.tls = null;
    settings.telemetry.otlp_endpoint = null;
  };
}
