"""Errors raised for bad input data (defined in :mod:`torchrec_genrec.errors`)."""

from torchrec_genrec.errors import DataError

__all__ = ["DataError"]
