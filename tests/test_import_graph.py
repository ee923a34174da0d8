"""The package's import graph follows the layers the README's "How it is built" names, with no cycles.

Read with ``ast`` (imports inside functions and under TYPE_CHECKING count too), so a lazy
import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import llama_mtp

PACKAGE = pathlib.Path(llama_mtp.__file__).parent

# Lowest first. A module imports only modules of its own or a lower layer. The test-model
# generator (llama_mtp.testing) is a tool beside the runtime: checked for cycles with the rest.
LAYERS: List[Set[str]] = [
    {"version", "errors", "results", "stats", "pieces", "checks", "llama_rules"},  # data, rules, pieces
    {"_loader", "_compat"},                                               # the shim's loader; the seam
    {"session", "checkpoint", "text", "verify", "adaptive", "prompt_cache", "chat_templates"},
    {"loading", "drafter", "core"},                    # the pair load() makes; which drafter; the step loop
    {"generation", "engine", "chat_completion"},
    {"mtp_llama"},
    {"testing"},
    {"server"},                                          # server.ray (Ray Serve app) included: above the app it serves
    {"", "cli", "__main__"},                                              # "": the package's own API
]


def module_names() -> Dict[str, pathlib.Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.with_suffix("").relative_to(PACKAGE).parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports_of(name: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """Modules of the package that ``name`` imports ("" is the package itself)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                base = [p for p in base if p]
            elif node.module and (node.module == "llama_mtp" or node.module.startswith("llama_mtp.")):
                base, node_module = [], node.module[len("llama_mtp"):].lstrip(".")
                base = node_module.split(".") if node_module else []
                found |= _resolve(base, [a.name for a in node.names], known)
                continue
            else:
                continue
            if node.module:
                base = base + node.module.split(".")
            found |= _resolve(base, [a.name for a in node.names], known)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "llama_mtp" or a.name.startswith("llama_mtp."):
                    found.add(a.name[len("llama_mtp"):].lstrip("."))
    found.discard(name)
    return {m for m in found if m in known}


def _resolve(base: List[str], names: List[str], known: Set[str]) -> Set[str]:
    """``from <base> import a, b``: the submodules a, b where they are modules, else <base> itself."""
    out = set()
    for n in names:
        sub = ".".join(base + [n])
        out.add(sub if sub in known else ".".join(base))
    return out


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if name in layer or top in layer:
            return i
    raise AssertionError(f"llama_mtp.{name} is in no layer of this test: add it where the README puts it")


def graph() -> Dict[str, Set[str]]:
    mods = module_names()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_import_goes_down_the_layers() -> None:
    g = graph()
    upward = sorted(f"llama_mtp.{a} imports llama_mtp.{b}" for a, deps in g.items() for b in deps
                    if layer_of(b) > layer_of(a))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def find_cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Every cycle a depth-first search meets (one per back edge)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    # llama_mtp.testing (the test-model generator) keeps its arch registry's cycles for now:
    # its arch modules register with the package that imports them
    g = {a: {b for b in deps if not b.startswith("testing")} for a, deps in graph().items()
         if not a.startswith("testing")}
    cycles = find_cycles(g)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(f"llama_mtp.{m}" for m in c) for c in cycles)


def test_the_checker_sees_a_planted_cycle(tmp_path) -> None:
    """The graph reader finds relative, absolute and function-local imports (so the tests above
    can fail): a synthetic package where b imports a inside a function."""
    pkg = tmp_path / "llama_mtp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .c import thing\n")
    (pkg / "b.py").write_text("def f():\n    from llama_mtp.a import x\n")
    (pkg / "c.py").write_text("import llama_mtp.b\n")
    known = {"", "a", "b", "c"}
    assert imports_of("a", pkg / "a.py", known) == {"b", "c"}
    assert imports_of("b", pkg / "b.py", known) == {"a"}
    assert imports_of("c", pkg / "c.py", known) == {"b"}
    g = {m: imports_of(m, pkg / f"{m}.py", known) for m in ("a", "b", "c")}
    assert find_cycles(g) == [["a", "b", "a"]]
