"""Coverage-guided fuzzing (atheris), bounded in time, from the committed seed
corpora in fuzz/corpus; and every input a fuzzer ever crashed on, kept in
tests/regressions, replayed as a regression test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from floatd.core.entitlement import (
    format_public_key,
    parse_activation_request,
    trusted_keys,
    verify_entitlement,
)
from floatd.errors import EntitlementError

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = sorted((ROOT / "tests" / "regressions").iterdir())
FUZZ_SECONDS = 15


@pytest.mark.parametrize("target", ["fuzz_protocol", "fuzz_files"])
def test_fuzz_target_runs_clean_for_a_while(target: str, tmp_path: Path) -> None:
    corpus = ROOT / "fuzz" / "corpus" / ("protocol" if target == "fuzz_protocol" else "entitlement")
    assert any(corpus.iterdir()), "the seed corpus is committed"
    (tmp_path / "found").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / f"{target}.py"),
            f"-max_total_time={FUZZ_SECONDS}",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path / "found"),  # new inputs go here, not into the committed seeds
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        cwd=tmp_path,
    )
    crashes = [
        p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-"))
    ]
    assert done.returncode == 0 and not crashes, done.stderr[-3000:]
    assert "Done" in done.stderr  # it really ran


def test_every_input_that_once_crashed_a_parser_is_refused_cleanly() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    assert REGRESSIONS, "tests/regressions holds the inputs fuzzing found"
    keys = trusted_keys([format_public_key(Ed25519PrivateKey.generate().public_key())])
    for path in REGRESSIONS:
        text = path.read_bytes().decode("utf-8", errors="replace")
        with pytest.raises(EntitlementError):
            verify_entitlement(text, keys, "0" * 32, 1.8e9, 60)
        with pytest.raises(EntitlementError):
            parse_activation_request(text)
