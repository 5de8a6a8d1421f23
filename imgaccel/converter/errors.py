"""Conversion errors, in a module of their own so that commands which only read images can
report them without importing the conversion pipeline."""


class ConversionError(Exception):
    """One image could not be converted; the message names the object and the cause."""


class NotConvertible(ConversionError):
    """The reference is not something to convert (a Helm chart, a signature, our own output)."""
