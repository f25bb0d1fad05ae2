"""The one error type of tessera.convert: the message names the file, tensor or config key at fault."""

from __future__ import annotations


class ConvertError(ValueError):
    """A checkpoint cannot be converted; the message says which file / tensor / key and why."""
