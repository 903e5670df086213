"""Exceptions a user can act on. The CLI maps every :class:`InputError` to exit code 2."""


class InputError(Exception):
    """Bad input: a spec, a checkpoint, a corpus or a size that cannot work. Nothing is cached."""


class UnsupportedModelError(InputError):
    """The checkpoint's architecture has no family adapter."""


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable or corrupt."""


class DataError(InputError):
    """The corpus cannot provide what the spec asks for."""


class NumericalError(Exception):
    """NaN or inf appeared in activations or weights; the message names where."""
