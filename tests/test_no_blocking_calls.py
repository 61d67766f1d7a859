"""No ``async def`` in the connector or the exporter calls psutil, the process helpers that
read /proc, or opens files directly: those block the event loop (a /proc walk is
O(processes on the machine)), so they go to a thread (``asyncio.to_thread``). Checked on
the source's syntax tree, so a new blocking call fails here rather than in production.

A call inside a nested ``def`` or ``lambda`` (what ``to_thread`` runs) is not on the loop and
is allowed.
"""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("connector", "exporter")

# Module-level names whose calls read /proc or the disk.
BLOCKING_MODULES = {"psutil"}
# connector.supervision.procs helpers that walk or read /proc (the async ones are fine).
BLOCKING_PROCS = {
    "tree",
    "tree_rss",
    "tree_pids",
    "same_process",
    "running_as_recorded",
    "create_time_of",
    "terminate_group",
    "kill_leftovers",
    "kill_groups",
    "identify",
    "wait_gone",
    "process_table",
    "process_tree",
}
BLOCKING_BUILTINS = {"open"}
# connector.supervision.logs helpers that touch the log folder.
BLOCKING_LOG_FILES = {
    "create_log_files",
    "list_log_folder",
    "delete_log_files",
    "tail_lines",
    "read_replica_lines",
}
BLOCKING_METHODS = {"read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink"}
# Calls that are as cheap as a syscall and documented as such where they are made.
ALLOWED: set[tuple[str, str, str]] = set()


def _calls_on_the_loop(fn: ast.AsyncFunctionDef) -> Iterator[ast.Call]:
    """Calls in ``fn``'s own body, not in functions defined inside it."""
    todo: list[ast.AST] = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Call):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _blocking_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name) and func.id in BLOCKING_BUILTINS | BLOCKING_LOG_FILES:
        return func.id
    if isinstance(func, ast.Attribute):
        owner = func.value
        if isinstance(owner, ast.Name) and owner.id in BLOCKING_MODULES:
            return f"{owner.id}.{func.attr}"
        if isinstance(owner, ast.Name) and owner.id == "procs" and func.attr in BLOCKING_PROCS:
            return f"procs.{func.attr}"
        if func.attr in BLOCKING_METHODS:
            return f".{func.attr}"
    return None


def _findings() -> list[str]:
    # Garbage left by earlier tests (an unclosed pipe transport) finalized inside ast.parse
    # trips CPython 3.11.7's AST recursion-depth check ("AST constructor recursion depth
    # mismatch"): it is collected first.
    gc.collect()
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            local_procs = rel == "connector/supervision/procs.py"
            for node in ast.walk(tree):
                if not isinstance(node, ast.AsyncFunctionDef):
                    continue
                for call in _calls_on_the_loop(node):
                    name = _blocking_name(call)
                    func = call.func
                    own = BLOCKING_PROCS | {"running"}
                    if name is None and local_procs and isinstance(func, ast.Name):
                        name = func.id if func.id in own else None
                    if name is None or (rel, node.name, name.split(".")[-1]) in ALLOWED:
                        continue
                    found.append(f"{rel}:{call.lineno} {node.name}() calls {name}")
    return found


def test_no_async_function_blocks_the_loop_on_proc_or_files() -> None:
    assert _findings() == []


def test_the_check_sees_a_blocking_call(tmp_path: Path) -> None:
    """The checker itself: a psutil call and a file read in an async body are found, the
    same calls inside a function handed to a thread are not."""
    source = (
        "async def bad():\n"
        "    psutil.Process(1).status()\n"
        "    open('x').read()\n"
        "    await asyncio.to_thread(lambda: psutil.pids())\n"
        "    def inner():\n"
        "        return procs.tree_pids(1)\n"
        "    return await asyncio.to_thread(inner)\n"
    )
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.AsyncFunctionDef)
    names = sorted(n for c in _calls_on_the_loop(fn) if (n := _blocking_name(c)))
    assert names == ["open", "psutil.Process"]
