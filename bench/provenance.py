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


# The CPU flags that decide which code a figure measured: -march=native builds
# of the C++ kernels, oneDNN's choice of AVX-512-BF16 or AMX for bfloat16
# linears. "AMD EPYC" alone names several generations, so figures carry both.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """{cpu_model, cpu_isa: the ISA_FLAGS this CPU has, in ISA_FLAGS' order},
    from `cpuinfo` (the text of /proc/cpuinfo, read when None; None and []
    where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return {"cpu_model": None, "cpu_isa": []}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first CPU's
    have = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name"),
        "cpu_isa": [f for f in ISA_FLAGS if f in have],
    }


def cpu_line(cpu: Mapping[str, Any]) -> str:
    """A cpu_description (or a result holding its fields) as one line for a
    markdown report: the model, then its ISA flags."""
    return f"{cpu['cpu_model']}, {' '.join(cpu['cpu_isa'])}"
