"""Knowing that the state database is the one this server wrote.

A database that is lost or swapped must not pass for an empty one: a server
that starts empty after its database was deleted, truncated, or lost its WAL
forgets every seat it had granted, and hands them out again while the old
holders still run (more seats in use than the entitlement allows).  So the
database carries a random id (``meta.state_id``), and a marker file beside it,
outside the database, names the id it must have:

- no id and no marker: a first start; an id is recorded, then the marker;
- the id and no marker: the marker is written again (nothing was lost);
- a marker and no id (the database is missing, empty, or lost the commits
  that held the id) or another id: the start is refused with one line that
  says what to do: restore the database, or ``floatd state reset``.

While running, the database file itself is watched: deleted, or replaced by
another file, it is noticed within a second (``check``), and the server stops
writing (UNAVAILABLE) until it is restarted on the right file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from floatd.errors import StoreError

MARKER = "state-id"
META_STATE_ID = "state_id"

RESET_HINT = "restore it from a backup, or run `floatd state reset` to start empty"


class StateIdentity:
    def __init__(self, database: Path) -> None:
        self.database = database
        self.marker = database.with_name(MARKER)
        self._file: tuple[int, int] | None = None

    def read_marker(self) -> str | None:
        try:
            text = self.marker.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.marker}: {exc.strerror}") from None
        return text or None

    def claim(self, meta: dict[str, str]) -> str | None:
        """Check the database against the marker at start (StoreError if it is
        not the one this server wrote); the new id to record on a first start."""
        expected = self.read_marker()
        found = meta.get(META_STATE_ID)
        if found is None:
            if expected is not None:
                raise StoreError(
                    f"the state database {self.database} is missing or empty, but this server"
                    f" kept state in it ({self.marker} names {expected}): {RESET_HINT}"
                    " (every lease it held is lost)"
                )
            return secrets.token_hex(16)
        if expected is None:
            self.write_marker(found)
        elif expected != found:
            raise StoreError(
                f"the state database {self.database} is not the one this server wrote"
                f" (id {found}, {self.marker} names {expected}): {RESET_HINT}"
            )
        return None

    def write_marker(self, state_id: str) -> None:
        tmp = self.marker.with_name(f".{MARKER}.tmp")
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(state_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.marker)

    def pin(self) -> None:
        """Remember which file the database is now (see :meth:`check`)."""
        st = os.stat(self.database)
        self._file = (st.st_dev, st.st_ino)

    def check(self) -> None:
        """StoreError if the database file was deleted or replaced since :meth:`pin`."""
        if self._file is None:
            return
        try:
            st = os.stat(self.database)
        except FileNotFoundError:
            raise StoreError(
                f"the state database {self.database} was deleted while floatd ran"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot stat the state database: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self._file:
            raise StoreError(
                f"the state database {self.database} was replaced by another file while floatd"
                " ran; restart floatd once the right file is in place"
            )

    def reset(self) -> list[Path]:
        """``floatd state reset``: move the database's files aside and forget the
        marker, so that the next start begins empty.  Returns what was moved."""
        moved = []
        stamp = secrets.token_hex(3)
        for suffix in ("", "-wal", "-shm"):
            path = self.database.with_name(self.database.name + suffix)
            if path.exists():
                target = path.with_name(f"{path.name}.reset-{stamp}")
                os.replace(path, target)
                moved.append(target)
        self.marker.unlink(missing_ok=True)
        return moved
