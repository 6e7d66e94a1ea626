"""One exception type for everything a user can fix: bad files, bad flags, unreachable servers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# A run that finished but left rows in OUT.failed.jsonl (teacher down, rate limits, unparsable replies):
# everything else is on disk and `--retry-failed` completes it, yet a script must not take the output as whole.
EXIT_ROWS_FAILED = 3

SKIP_BAD_ROWS_HELP = ("Set aside rows that do not parse (a missing field, an empty answer, a cut JSONL line), each "
                      "named in a warning, and train on the rest (else the first one stops the run).")


def set_aside_warning(bad_rows: list[str], shown: int = 5) -> str:
    """One line naming the first `shown` rows a `--skip-bad-rows` run set aside, each by its own error."""
    more = f" (and {len(bad_rows) - shown} more)" if len(bad_rows) > shown else ""
    return f"{len(bad_rows)} bad row(s) set aside{more}: " + "; ".join(bad_rows[:shown])


class UserError(Exception):
    """An error shown as one line (no traceback unless --debug), naming file, row and field when known."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = ""
        if file is not None:
            where = str(file) + (f":{line}" if line is not None else "") + ": "
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")


class BadRow(UserError):
    """One row of a data file that does not parse: a training command's --skip-bad-rows can set it aside."""


@contextmanager
def suggesting_skip_bad_rows() -> Iterator[None]:
    """A BadRow raised inside stops the run as one line that names the flag which would have set it aside."""
    try:
        yield
    except BadRow as error:
        raise UserError(f"{error} (--skip-bad-rows sets such rows aside and trains on the rest)") from None
