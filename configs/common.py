"""Helpers shared by the config files."""

from __future__ import annotations


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses ``"local,cohort=sarcoma_phantom,modalities=image"`` into a dict.

  A bare word sets that key to True; ``key=value`` keeps the string value
  (converted to the type of the default when one is given). Unknown keys
  raise ValueError listing the known ones.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not sep:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(defaults[key], int):
      out[key] = int(value)
    else:
      out[key] = value
  return out
