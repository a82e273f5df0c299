"""server/ stays readable (issue 18): no function over 60 lines, no file over 400."""

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    # From `def` to the last line of the body: decorators are not counted.
    return node.end_lineno - node.lineno + 1


def test_no_server_function_is_over_60_lines():
    long = []
    for path in sorted(SERVER.rglob("*.py")):
        for node in _functions(ast.parse(path.read_text())):
            if _function_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{path.name}:{node.lineno} {node.name} ({_function_lines(node)})")
    assert not long, long


def test_no_server_file_is_over_400_lines():
    long = {
        p.name: n
        for p in SERVER.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, long


def test_the_measure_counts_from_def_to_the_end_not_decorators():
    source = "@decorator\n@another\ndef f():\n    a = 1\n    return a\n"
    (node,) = _functions(ast.parse(source))
    assert _function_lines(node) == 3
