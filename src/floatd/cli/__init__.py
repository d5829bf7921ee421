"""The ``floatd`` command line, one module per group of commands.

Exit status: 0 success, 1 refused or failed, 2 usage or config error; a failure
is one line on stderr (or, with ``--json``, a JSON document), never a traceback.
"""

from floatd.cli import (
    activation,
    admin,
    cluster,
    daemon,
    maintenance,
    policy,
    probe,
    trail,
    users,
)
from floatd.cli.base import CONTEXT, HelpGroup, fail, main, make_guard, plural
from floatd.cli.daemon import check_startable, run_server

__all__ = [
    "CONTEXT",
    "HelpGroup",
    "activation",
    "admin",
    "check_startable",
    "cluster",
    "daemon",
    "fail",
    "main",
    "maintenance",
    "make_guard",
    "plural",
    "policy",
    "probe",
    "run_server",
    "trail",
    "users",
]
