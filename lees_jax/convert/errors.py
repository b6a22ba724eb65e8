"""The errors every importer raises (a package-wide base, so callers catch one type).

`ConversionError` is a ValueError: the command line prints it without a traceback.
"""


class ConversionError(ValueError):
  """The source checkpoint cannot be represented exactly by our backbone."""


class SourceUnavailableError(ConversionError):
  """The checkpoint files could not be found or downloaded; the message says what to do."""


class MissingOnHubError(SourceUnavailableError):
  """The Hub repository exists and was reached, but lacks the files asked for."""


def tensor_mismatch(model: str, *, missing=(), unexpected=(), wrong=(), extra=()) -> ConversionError:
  """One error naming every problem of a state dict against the model its config describes
  (``model``, e.g. "UNet (ch=128, ...)"): missing tensors, unexpected ones (already formatted
  with their shapes), wrong ones, and ``extra`` (title, items) sections."""
  sections = [('missing tensor(s)', missing), ('unexpected tensor(s)', unexpected),
              ('tensor(s) with the wrong shape or dtype, or non-finite values', wrong), *extra]
  parts = [f'{len(items)} {title}:\n    ' + '\n    '.join(items) for title, items in sections if items]
  return ConversionError(f'the checkpoint does not match the {model} its config describes:\n  '
                         + '\n  '.join(parts))
