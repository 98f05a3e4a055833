"""The one error type raised for user mistakes."""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException


class NeuronsError(ValueError, MisconfigurationException):
    """A user mistake: a wrong argument, layer name, batch layout or model shape.

    Subclasses ``ValueError`` (so ``except ValueError`` catches it) and Lightning's
    ``MisconfigurationException`` (so Lightning reports it like its own configuration errors).
    The message always says what is wrong and what would be right.
    """
