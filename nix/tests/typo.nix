# A typo in the escape hatch: evaluation succeeds, the build-time `--check-config` of the
# scheduler fails naming the key (`scheduler.reserv`).
{
  services.securellm = {
    enable = true;
    settings.scheduler.reserv = "1GiB";
  };
}
