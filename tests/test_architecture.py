"""The package's shape: every module imports, no import cycle (function-level imports included), and stage two
reaches into stage one only through the live teacher."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "kdcache"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """kdcache modules `name` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks)."""
    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            if t.split(".")[0] == "kdcache" and (r := resolve(t)) and r != name:
                found.add(r)
    return found


GRAPH = {m: imports_of(m, p, modules()) for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The walker sees a function-level import (so the test above can fail)."""
    (tmp_path / "a.py").write_text("def f():\n    from kdcache.train import loop\n")
    assert "kdcache.train.loop" in imports_of("kdcache.zz", tmp_path / "a.py", modules())


def test_stage_two_reaches_stage_one_only_through_the_live_teacher():
    stage_two = [m for m in GRAPH if m.startswith(("kdcache.train", "kdcache.cache", "kdcache.students"))]
    for m in stage_two:
        into_capture = {n for n in GRAPH[m] if n.startswith("kdcache.capture")}
        assert not into_capture or m == "kdcache.train.live", (m, into_capture)
    stage_one = [m for m in GRAPH if m.startswith("kdcache.capture")]
    for m in stage_one:
        assert not {n for n in GRAPH[m] if n.startswith("kdcache.train")}, m


def test_a_test_needing_missing_shared_data_skips_and_ci_makes_it_fail(monkeypatch):
    from conftest import require_shared_data
    monkeypatch.delenv("KDCACHE_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no-such-set .*KDCACHE_DATA"):
        require_shared_data("no-such-set")
    monkeypatch.setenv("KDCACHE_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-set"):
        require_shared_data("no-such-set")


def test_no_module_holds_several_rooms():
    """Modules stay small enough to hold one concept (cli.py, the one command-line surface, excepted)."""
    big = {str(p.relative_to(REPO)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 500 and p.name != "cli.py"}
    assert not big, f"split these by concept: {big}"


def test_the_config_reference_imports_no_torch():
    """`kdcache config --reference` reads the schema and the registries' names only: no torch."""
    import subprocess
    import sys
    code = ("import sys; from kdcache.cli import main; main(['config', '--reference']); "
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "## `PipelineConfig`" in out.stdout and out.stderr.endswith("NO-TORCH"), out.stderr[-500:]
