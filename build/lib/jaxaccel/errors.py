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
