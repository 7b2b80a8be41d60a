"""The root of the errors a job can end with, and one shape for every validation problem.

`GattError` is what the core and the engine raise when the input or the model is at fault: its
`job_code` is stable (a failed job's `error.code`) and its message says what to do. Anything else
that ends a job is an internal error.

The service turns validation problems into HTTP 422 bodies unchanged, so a problem carries a
stable `code`, a human `message`, the `field` path it concerns ("messages[2].role") and, for
files, the 1-based `line` number. Validators collect *every* problem and raise once, never
stopping at the first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class GattError(Exception):
    """An error a user can act on; `job_code` names it for programs."""

    job_code = "internal_error"


@dataclass(frozen=True)
class Problem:
    code: str
    message: str
    field: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message} [{self.code}]"


class ValidationFailed(GattError, ValueError):
    """Raised with the complete list of problems found in one input."""

    job_code = "invalid_input"

    def __init__(self, what: str, problems: list[Problem]):
        self.what = what
        self.problems = problems
        shown = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"invalid {what}: {shown}{more}")


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """A hint such as ` (did you mean 'messages'?)` naming the closest known key, or ""."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
