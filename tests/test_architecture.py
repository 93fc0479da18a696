"""The import graph of the tree: arrows point down the layers only, and there is no cycle.

    raft_diffusion (cli, __main__, the legacy toyworld alias)   wires the kinds
    raft_diffusion.diffusion | raft_diffusion.llm                 the two kinds; neither imports the other
    raft_diffusion.core                                           model-agnostic; no diffusers/transformers/peft
    reward_models                                                 imports nothing of raft_diffusion

Every import counts, also those inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raft_diffusion", "reward_models")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Absolute names of everything ``name`` imports (a submodule when one is named, else its package)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out.update(subs or [mod])
            if subs and len(subs) < len(node.names):
                out.add(mod)
    return out


def _layer(mod: str) -> str | None:
    if mod.startswith("reward_models"):
        return "rewards"
    for layer in ("core", "diffusion", "llm"):
        if mod == f"raft_diffusion.{layer}" or mod.startswith(f"raft_diffusion.{layer}."):
            return layer
    return "top" if mod.split(".")[0] == "raft_diffusion" else None


# what each layer may import (itself included)
ALLOWED = {
    "rewards": {"rewards"},
    "core": {"core", "rewards"},
    "diffusion": {"diffusion", "core", "rewards"},
    "llm": {"llm", "core", "rewards"},
    "top": {"top", "diffusion", "llm", "core", "rewards"},
}
HEAVY = ("diffusers", "transformers", "peft", "open_clip")  # the core stays model-agnostic


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_imports_point_down_only(graph):
    wrong = []
    for mod, targets in graph.items():
        for t in targets:
            lt = _layer(t)
            if lt is not None and lt not in ALLOWED[_layer(mod)]:
                wrong.append(f"{mod} ({_layer(mod)}) imports {t} ({lt})")
            if _layer(mod) == "core" and t.split(".")[0] in HEAVY:
                wrong.append(f"{mod} (core) imports {t}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_internal_import_resolves(graph):
    """A module moved without its importers updated is caught here, not in a slow end-to-end test."""
    known = set(graph)
    users = dict(graph)
    for folder in ("scripts", "tests", "examples"):  # what imports the packages from outside
        for path in sorted((ROOT / folder).glob("*.py")):
            users[f"{folder}/{path.name}"] = _imports(f"{folder}.{path.stem}", path, _modules())
    broken = [f"{mod} imports {t}" for mod, targets in users.items() for t in targets if t.split(".")[0] in PACKAGES and t not in known]
    assert not broken, "\n".join(sorted(broken))


def test_no_import_cycles(graph):
    known = set(graph)
    edges = {m: {t for t in ts if t in known and t != m} for m, ts in graph.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    cycles = _strongly_connected(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(sorted(c)) for c in cycles)


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (iterative); returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.add(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(comp)
            elif nxt not in index:
                index[nxt] = low[nxt] = counter
                counter += 1
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(sorted(edges[nxt]))))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return found


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The two checks on a made-up graph: they would fail on a wrong tree."""
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []
    assert "core" not in ALLOWED["rewards"] and "diffusion" not in ALLOWED["core"] and "llm" not in ALLOWED["diffusion"]
    src = tmp_path / "m.py"
    src.write_text("from ..diffusion import task\nimport raft_diffusion.llm.config\n")
    known = {"raft_diffusion.diffusion.task": src}
    assert _imports("raft_diffusion.core.m", src, known) == {"raft_diffusion.diffusion.task", "raft_diffusion.llm.config"}


def test_the_two_kinds_have_the_same_shape():
    """diffusion/ and llm/ mirror each other: config, CLI, task, evaluation/report, toy world."""
    for kind in ("diffusion", "llm"):
        pkg = ROOT / "raft_diffusion" / kind
        for part in ("config.py", "cli.py", "task.py", "toyworld/__init__.py", "toyworld/cli.py", "toyworld/build.py"):
            assert (pkg / part).is_file(), f"{kind}/{part} missing"
    assert (ROOT / "raft_diffusion/diffusion/gallery.py").is_file() and (ROOT / "raft_diffusion/llm/report.py").is_file()


def test_core_config_names_no_diffusion_concept():
    text = (ROOT / "raft_diffusion/core/config.py").read_text(encoding="utf-8").lower()
    for word in ("unet", "stable diffusion", "diffusers", "snr_gamma", "timestep", "clip", "guidance", "lora", "image"):
        assert word not in text, f"core/config.py mentions {word!r}"
