"""Which code produced a result: every results JSON a bench script writes
carries the git commit it ran at, and whether tracked files had uncommitted
changes (then the commit alone does not tell what ran).

A long run may outlive later commits in the same checkout, so a script calls
git_provenance() when it starts: the first answer is kept for the process,
and write_json stamps that one.
"""

import json
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The keys stamped into every results JSON.
COMMIT_KEY, DIRTY_KEY = "git_commit", "git_dirty"


def _git(repo: Path, *words: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *words], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return None
    return out.stdout.strip()


def read_git_provenance(repo: Path = REPO) -> dict[str, Any]:
    """{git_commit: short HEAD, git_dirty: tracked files differ from HEAD}, read
    now; both None outside a git checkout. Untracked files do not count: a
    results folder or a scratch file beside the code does not change what ran."""
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    if commit is None:
        return {COMMIT_KEY: None, DIRTY_KEY: None}
    changes = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {COMMIT_KEY: commit, DIRTY_KEY: None if changes is None else bool(changes)}


@cache
def git_provenance() -> dict[str, Any]:
    """This checkout's provenance as first read in this process (see the module doc)."""
    return read_git_provenance(REPO)


def describe(provenance: Mapping[str, Any]) -> str:
    """One line for a markdown report: `abc1234`, `abc1234 (dirty)` or `unknown`."""
    commit = provenance.get(COMMIT_KEY) or "unknown"
    return f"{commit} (dirty)" if provenance.get(DIRTY_KEY) else commit


def with_provenance(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`payload` with git_commit and git_dirty first (replacing any of its own)."""
    stamp = dict(git_provenance())
    return {**stamp, **{k: v for k, v in payload.items() if k not in stamp}}


def write_json(path: Path, payload: Mapping[str, Any], indent: int = 2) -> Path:
    """Write `payload` as JSON to `path`, stamped with the commit (with_provenance)."""
    path.write_text(json.dumps(with_provenance(payload), indent=indent) + "\n", encoding="utf-8")
    return path


# The instruction sets the CPU figures depend on (matrix units, bf16 dot products).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> dict[str, Any]:
    """{cpu_model, cpu_isa}: the CPU's model name and which of ISA_FLAGS it has.
    The machines of one pool differ (AMX on some, not others): figures say
    which one they came from."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"cpu_model": None, "cpu_isa": []}
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"cpu_model": model, "cpu_isa": [f for f in ISA_FLAGS if f in flags]}
