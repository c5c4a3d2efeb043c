# The two lines a user writes: no package given (the module builds it from this tree).
{
  services.securellm.enable = true;
}
