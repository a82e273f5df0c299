"""bench/provenance.py: every results JSON a bench script writes names the git
commit it ran at (short hash) and whether tracked files had changes."""

import ast
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import provenance
from bench.provenance import describe, read_git_provenance, with_provenance, write_json

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *words: str) -> str:
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    done = subprocess.run(
        ["git", "-C", str(repo), *identity, *words], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout with one committed file."""
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q")
    (path / "code.py").write_text("x = 1\n")
    _git(path, "add", "code.py")
    _git(path, "commit", "-q", "-m", "first")
    return path


@pytest.fixture
def pinned(repo: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """git_provenance() reads `repo` for this test (and is read afresh after)."""
    monkeypatch.setattr(provenance, "REPO", repo)
    provenance.git_provenance.cache_clear()
    yield {"git_commit": _git(repo, "rev-parse", "--short", "HEAD"), "git_dirty": False}
    provenance.git_provenance.cache_clear()


def test_the_short_commit_and_a_dirty_flag(repo: Path):
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert read_git_provenance(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "results.json").write_text("{}")  # untracked: not what ran
    assert read_git_provenance(repo)["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")  # a tracked change: the commit is not all
    assert read_git_provenance(repo) == {"git_commit": head, "git_dirty": True}
    assert describe(read_git_provenance(repo)) == f"{head} (dirty)"


def test_outside_a_checkout_nothing_is_claimed(tmp_path: Path):
    assert read_git_provenance(tmp_path) == {"git_commit": None, "git_dirty": None}
    assert describe(read_git_provenance(tmp_path)) == "unknown"


def test_the_commit_is_read_once_as_the_run_starts(repo: Path, pinned: dict):
    assert provenance.git_provenance() == pinned
    (repo / "code.py").write_text("x = 3\n")
    _git(repo, "commit", "-q", "-am", "a later commit, while the run goes on")
    assert provenance.git_provenance() == pinned


def test_write_json_stamps_the_commit_first(pinned: dict, tmp_path: Path):
    path = write_json(tmp_path / "r.json", {"git_commit": "stale", "rows": [1, 2]}, indent=1)
    data = json.loads(path.read_text())
    assert data == {**pinned, "rows": [1, 2]}
    assert list(data)[:2] == ["git_commit", "git_dirty"]
    assert with_provenance({"a": 1}) == {**pinned, "a": 1}


def test_the_project_checkout_is_the_one_read():
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if not head:
        pytest.skip("this copy of the project is not a git checkout")
    assert read_git_provenance()["git_commit"] == head


# -- every writer of a results JSON ----------------------------------------------


def _serve(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench.serve import report

    monkeypatch.setattr(report, "render_report", lambda result: "")
    return report.write_results({"label": "run"}, tmp)[0]


def _compare(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench.peer.compare import Server, parse_args, write_outputs

    args = parse_args(["--concurrency", "16", "--rounds", "1"])
    write_outputs([], [Server("keyserve-full", [])], args, tmp)
    return tmp / "results.json"


def _throughput(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench import throughput

    monkeypatch.setattr(throughput, "render_markdown", describe)  # the md names it too
    json_path, md_path = throughput.write_results({"settings": {}}, tmp, "t")
    assert md_path.read_text() == describe(json.loads(json_path.read_text()))
    return json_path


def _eviction(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench import eviction_report

    monkeypatch.setattr(eviction_report, "render_markdown", lambda report, png: describe(report))
    json_path, md_path = eviction_report.write_results({"settings": {}}, tmp, "e", plot=False)
    assert md_path.read_text() == describe(json.loads(json_path.read_text()))
    return json_path


def _accuracy(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench.accuracy import report

    return report.write_all(tmp, [], {"command": "x", "summary": {}})["json"]


def _dtype_report(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench.accuracy import dtype_report

    report = {"command": "x", "report_cpu": "c", "rows": [], "full_disagreements": []}
    side = {"dtype": "float32", "folders": []}
    return dtype_report.write_report(tmp, {**report, "run": side, "reference": side})["json"]


def _soak(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench import soak

    soak.write_report(tmp, soak.Report(), "python -m bench.soak")
    return tmp / "soak.json"


def _long_context(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench import long_context

    monkeypatch.setattr(long_context, "markdown", lambda meta, rows: "")
    long_context.write_report(tmp, "lc", {"device": "cpu"}, [])
    return tmp / "lc.json"


def _paired(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from bench import paired

    monkeypatch.setattr(paired, "markdown", lambda result: "")
    paired.write_report(tmp, "p", {"a": {"commit": "x"}, "b": {"commit": "y"}})
    return tmp / "p.json"


WRITERS = [
    _serve,
    _compare,
    _throughput,
    _eviction,
    _accuracy,
    _dtype_report,
    _soak,
    _long_context,
    _paired,
]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__.strip("_"))
def test_every_results_json_names_the_commit(writer, pinned, tmp_path, monkeypatch):
    data = json.loads(writer(tmp_path, monkeypatch).read_text())
    assert (data["git_commit"], data["git_dirty"]) == (pinned["git_commit"], False)


def _writes_json_itself(tree: ast.AST) -> list[int]:
    """Lines that call json.dump, or write_text(json.dumps(...)), directly."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        dumps_inside = any(
            isinstance(n, ast.Attribute) and n.attr == "dumps"
            for a in node.args
            for n in ast.walk(a)
        )
        if name == "dump" or (name == "write_text" and dumps_inside):
            lines.append(node.lineno)
    return lines


def test_no_bench_script_writes_json_around_the_helper():
    """So a new results writer cannot skip the stamp unnoticed."""
    bench = ROOT / "bench"
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sorted(bench.rglob("*.py"))
        if path.name != "provenance.py" and "results" not in path.relative_to(bench).parts
        if (lines := _writes_json_itself(ast.parse(path.read_text())))
    }
    assert not found, found
