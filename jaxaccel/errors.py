"""One exception family for everything a user can get wrong.

Every message says what was wrong, the value given, and what to do instead.
The command line turns these into a one-line error and exit code 2.
"""


class JaxaccelError(ValueError):
  """Base class of every error jaxaccel raises on bad input."""


class DataError(JaxaccelError):
  """A data set is missing, malformed, or does not fit the model."""


class ConfigError(JaxaccelError):
  """An argument, model name or run setting is invalid."""


class CheckpointError(JaxaccelError):
  """A run directory or checkpoint is missing, corrupt, or does not match."""


class SpecError(JaxaccelError):
  """An optimizer chain spec cannot be parsed or names something unknown."""


def optional(module: str, extra: str):
  """Imports `module`, an optional dependency; a ConfigError naming the
  extra that installs it when it is missing."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ConfigError(f"this needs {module.split('.')[0]}, which is optional: "
                      f"pip install 'jaxaccel[{extra}]'") from None
