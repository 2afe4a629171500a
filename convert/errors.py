"""The converter's one error type (its own module so every conversion module can raise it)."""


class ConversionError(ValueError):
    """Input the converter cannot use; the message names the problem and how to fix it."""
