"""What the daemon's parts share, handed to each of them in one piece.

The server composes its parts (the state keeper, the licensing, the
connections) around one service, one store and one committer.  Each part gets
this record rather than the server, so it sees only these, and a reload that
replaces the config replaces it for all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from floatd.config import Config
from floatd.core.service import LeaseService
from floatd.daemon.committer import GroupCommitter, RunSync
from floatd.store.sqlite import LeaseStore


@dataclass
class Shared:
    #: The config in force; a reload replaces it (restart-only keys keep their value).
    config: Config
    service: LeaseService
    store: LeaseStore
    committer: GroupCommitter
    #: The wall clock, watched for steps (Server.clock).
    clock: Callable[[], float]
    #: How blocking work leaves the event loop (a worker thread; inline in tests).
    run_sync: RunSync
    #: Commit what the last service call changed and answer the waiters it served.
    flush: Callable[[], Any]
