"""What can go wrong with a store, as one family of exceptions.

Every message names the store, file or field at fault and says what to do, so the
command line prints it as one line (`error: ...`) and the page shows it as it is.
"""

from __future__ import annotations

from trainer.errors import PreflabError


class StoreError(PreflabError):
    """Base of every store problem a user can act on."""


class StoreNotFound(StoreError, FileNotFoundError):
    """The store does not exist (a directory that is not there, a database that is not)."""


class StorePermissionError(StoreError, PermissionError):
    """A file or directory of the store cannot be read or written for lack of permission.
    Never reported as "damaged": the data is there, the process may not touch it."""


class StoreWriteError(StoreError):
    """An event could not be made durable (disk full, I/O error, database gone). The
    event is NOT acknowledged and nothing already stored was touched: try again."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, or refused the credentials."""


class StoreBusy(StoreError):
    """Another `preflab serve` already assigns pairs from this directory store."""


class VoteConflict(StoreError):
    """The shared assignment refused a vote: this annotator already has a standing vote on
    the pair, or the pair already has the votes it wants (another server's annotators
    took the last slots). Nothing was stored; the annotator gets another pair."""
