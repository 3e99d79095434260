"""What an attacker's pickle does: an object that, unpickled, calls a function of the attacker's choice."""

import os
import shlex
from pathlib import Path


class Payload:
    """Pickles as a call of `fn(*args)`, as an attacker's file would."""

    def __init__(self, fn: object, args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.fn, self.args


def touching(marker: Path) -> Payload:
    """A payload that runs a shell command creating `marker`: proof that the file's code ran."""
    return Payload(os.system, (f"touch {shlex.quote(str(marker))}",))
