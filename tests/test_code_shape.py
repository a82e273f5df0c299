"""The shape the house keeps: no module over 400 lines and no function over 60
in the product's packages, so each stays readable in one sitting."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "scheduler", "kv_manager", "server")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """From `def` to the body's last line: decorators do not count."""
    return node.end_lineno - node.lineno + 1


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_lengths(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [
        f"{node.name} (line {node.lineno}): {_function_lines(node)} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and _function_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_check_sees_the_packages() -> None:
    # A wrong ROOT would make the test above pass on nothing.
    assert len(_modules()) > 50


def test_a_function_is_measured_from_def_to_its_end_not_its_decorators() -> None:
    source = "@decorator\n@another\ndef f():\n    a = 1\n    return a\n"
    (node,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    assert _function_lines(node) == 3
