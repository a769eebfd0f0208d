"""Allow-list unpickling: the one rule for reading pickles that ckptavg did not write.

A pickle names the classes it needs; an allow-list unpickler answers only the names it knows, each with
an inert stand-in or a plain type, and refuses the rest before anything from the file can run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import CheckpointFormatError


class Refused(pickle.UnpicklingError):
    """A pickle asked for a class outside the allow-list; the message is its dotted name."""


def refusal(path: Path, name: str, why: str = "") -> CheckpointFormatError:
    """The error for a refused class: what was refused, why it matters, and the opt-in.

    Only for files that hold weights: files of training state (optimizer, RNG) are refused with a message
    of their own, since unpickling them would not give weights anyway.
    """
    return CheckpointFormatError(
        f"{path}: safe loading refused to unpickle '{name}' ({why}it could run code). "
        "If you trust this file, pass --trust-pickle."
    )
