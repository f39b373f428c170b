"""The sidecar's record of the run it watches: the ledger, loaded once and saved after
every change.

A ledger write that fails (a full disk, a read-only volume) is logged and never stops a
recovery: the next save writes the whole ledger again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sidecar import events
from sidecar.run.ledger import Ledger, LedgerStore
from sidecar.run.paths import RunPaths


class RunRecord:
    def __init__(self, paths: RunPaths, log: Any) -> None:
        self.paths = paths
        self.store = LedgerStore(paths.state_dir)
        self.ledger = self.store.load()  # LedgerError when it exists but cannot be read
        self.log = log
        # When the sidecar last wrote the launch script (st_mtime_ns), kept with every save.
        self.script_written: Callable[[], int | None] = lambda: None

    def replace(self, ledger: Ledger) -> None:
        """Keep ``ledger`` as this run's and save it."""
        self.ledger = ledger
        self.save()

    def save(self) -> None:
        written = self.script_written()
        if written is not None:
            self.ledger.script_mtime_ns = written
        try:
            self.store.save(self.ledger)
        except OSError as error:
            self.log.error(events.LEDGER_WRITE_FAILED, path=str(self.store.path), error=str(error))
