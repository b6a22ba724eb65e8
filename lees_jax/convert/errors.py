"""The errors every importer raises (a package-wide base, so callers catch one type).

`ConversionError` is a ValueError: the command line prints it without a traceback.
"""


class ConversionError(ValueError):
  """The source checkpoint cannot be represented exactly by our backbone."""


class SourceUnavailableError(ConversionError):
  """The checkpoint files could not be found or downloaded; the message says what to do."""
