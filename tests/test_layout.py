"""The package layout, read from the source with ``ast``: first-party imports (module level and inside
functions) form no cycle and never go up a floor, every module has a floor, no source file is over 450 lines,
and no tracked file refers to documents outside the repository.

Floors, bottom up (a module may import its own floor and the floors below it):
- method: the model and what computes it (config, models, tuning, generation, processing, tokenizer, atomic);
- machinery: training, checkpoints, caches, evaluation, distributed and SLURM plumbing, and the thin Lightning
  packages ``datamodules`` and ``callbacks`` (which the rest of ``ibllm`` never imports);
- applications: the Python API, the command line, the browser demo, the HTTP server, the demos and the package
  root (which may expose ``api.load`` lazily).
"""

from __future__ import annotations

import ast
import re
import subprocess
from fnmatch import fnmatchcase
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("ibllm", "callbacks", "datamodules")
MAX_LINES = 450


def tree(name: str) -> tuple[str, str]:
    """Patterns for a module and everything below it (a module may later become a package)."""
    return name, name + ".*"


FLOORS: dict[str, tuple[str, ...]] = {  # bottom up; fnmatch patterns on dotted module names
    "method": (*tree("ibllm.config"), *tree("ibllm.models"), *tree("ibllm.tuning"), *tree("ibllm.generation"),
               *tree("ibllm.processing"), *tree("ibllm.tokenizer"), *tree("ibllm.atomic"), *tree("ibllm.files")),
    "machinery": (*tree("ibllm.lit"), *tree("ibllm.build"), *tree("ibllm.checkpoints"), *tree("ibllm.distributed"),
                  "ibllm.cache*", *tree("ibllm.features"), *tree("ibllm.stage0"), *tree("ibllm.stage0_recipe"),
                  *tree("ibllm.evaluation"), *tree("ibllm.meta_init"),
                  *tree("ibllm.lit_config"),
                  *tree("ibllm.slurm"), *tree("ibllm.verbs"), *tree("datamodules"), *tree("callbacks")),
    "applications": ("ibllm", "ibllm.__main__", *tree("ibllm.api"), *tree("ibllm.cli"), *tree("ibllm.web"),
                     *tree("ibllm.web_uploads"), *tree("ibllm.web_preview"), *tree("ibllm.server"),
                     *tree("ibllm.demos")),
}
# Lightning-only packages: inside ibllm, only the applications floor may import them.
LIGHTNING_ONLY = ("datamodules", "callbacks")
OUTSIDE_REFERENCE = re.compile(r"SPEC\s*(§|D\d|P\d)|\.\./shared|ENVIRONMENT\.md")


# ---- the walker -------------------------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a source file under ``root`` (a package's ``__init__.py`` names the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path, packages: tuple[str, ...] = FIRST_PARTY) -> dict[str, Path]:
    """Module name -> file, for every ``*.py`` under the given top-level packages of ``root``."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts and not path.name.startswith("."):
                files[module_name(path, root)] = path
    return files


def resolve(name: str, modules: set[str] | dict[str, Path]) -> str | None:
    """The first-party module an imported dotted name lives in (its longest known prefix), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: set[str] | dict[str, Path]) -> set[str]:
    """First-party modules that ``module`` imports anywhere in its file (top level, functions, classes).

    ``from P import x`` depends on ``P.x`` when that is a module, else on ``P``; relative imports are resolved.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        deps.update(found for n in names if (found := resolve(n, modules)) and found != module)
    return deps


def import_graph(root: Path, packages: tuple[str, ...] = FIRST_PARTY) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports."""
    files = source_files(root, packages)
    return {module: imports_of(module, path, files) for module, path in files.items()}


def is_inside(child: str, package: str) -> bool:
    """True when ``child`` is a submodule (at any depth) of ``package``."""
    return child.startswith(package + ".")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a list of modules, first repeated last) per strongly connected group of modules;
    a package importing its own children does not count."""
    edges = {m: sorted(d for d in deps if not is_inside(d, m) and d in graph) for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(shortest_cycle(min(group), group, edges) for group in groups)


def shortest_cycle(start: str, group: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside a strongly connected group (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    return paths[v] + [start]
                if w in group and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} holds no cycle through {start}")


def floor_of(module: str, floors: dict[str, tuple[str, ...]] = FLOORS) -> str | None:
    """The floor whose patterns name ``module``, or None when no floor does."""
    return next((floor for floor, patterns in floors.items() if any(fnmatchcase(module, p) for p in patterns)), None)


def upward_imports(graph: dict[str, set[str]], floors: dict[str, tuple[str, ...]] = FLOORS,
                   lightning_only: tuple[str, ...] = LIGHTNING_ONLY) -> list[str]:
    """Every import of a higher floor, and every import of a Lightning-only package from inside the ``ibllm``
    core (any floor but the top one); modules without a floor are left to :func:`unplaced_modules`."""
    order = list(floors)
    problems = []
    for module in sorted(graph):
        here = floor_of(module, floors)
        for dep in sorted(graph[module]):
            there = floor_of(dep, floors)
            if here is None or there is None:
                continue
            if order.index(there) > order.index(here):
                problems.append(f"{module} ({here}) imports {dep} ({there})")
            elif (here != order[-1] and module.split(".")[0] not in lightning_only
                  and dep.split(".")[0] in lightning_only):
                problems.append(f"{module} ({here}) imports {dep} (Lightning-only: only applications may)")
    return problems


def unplaced_modules(graph: dict[str, set[str]], floors: dict[str, tuple[str, ...]] = FLOORS) -> list[str]:
    """Modules that no floor names."""
    return sorted(m for m in graph if floor_of(m, floors) is None)


def long_files(root: Path, packages: tuple[str, ...] = FIRST_PARTY, limit: int = MAX_LINES) -> list[str]:
    """``path: N lines`` for every source file over ``limit`` lines."""
    out = []
    for path in source_files(root, packages).values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return sorted(out)


def tracked_files(root: Path) -> list[Path]:
    """The files git tracks under ``root``."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return [root / name for name in out.decode().split("\0") if name]


def outside_references(files: list[Path], root: Path) -> list[str]:
    """``path:line: text`` for every line of a text file that points at a document outside the repository."""
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files; files deleted in the working tree but not yet in git
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()[:100]}")
    return found


def report(title: str, problems: list[str], hint: str) -> str:
    """A failure message: what is wrong, one problem a line, then what to do."""
    return f"{title} ({len(problems)}):\n  " + "\n  ".join(problems) + f"\n{hint}"


# ---- the checks on this repository ------------------------------------------------------------------------


def test_no_import_cycle():
    cycles = [" -> ".join(c) for c in import_cycles(import_graph(REPO))]
    assert not cycles, report("import cycles among first-party modules", cycles,
                              "Move what both sides need into a lower module.")


def test_no_upward_import():
    problems = upward_imports(import_graph(REPO))
    assert not problems, report("imports of a higher floor", problems,
                                "Method imports only method; machinery imports method and machinery.")


def test_every_module_has_a_floor():
    unplaced = unplaced_modules(import_graph(REPO))
    assert not unplaced, report("modules on no floor", unplaced,
                                "Place each in FLOORS (tests/test_layout.py): method, machinery or applications.")


def test_no_source_file_over_the_line_limit():
    problems = long_files(REPO)
    assert not problems, report(f"source files over {MAX_LINES} lines", problems,
                                "Split them into single-purpose modules.")


def test_no_reference_to_documents_outside_the_repository():
    problems = outside_references(tracked_files(REPO), REPO)
    assert not problems, report("references to documents outside the repository", problems,
                                "State the fact itself, in the project's own words.")


# ---- the walker on a small package of its own ---------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> None:
    """Write ``{relative path: source}`` under ``root``."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_walker_finds_cycles_upward_imports_and_unplaced_modules(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "from pkg import low\nfrom . import high\n",  # a package importing its children
        "pkg/low.py": "import os\n\n\ndef f():\n    from pkg.high import g  # inside a function\n    return g\n",
        "pkg/high.py": "import pkg\nfrom .low import f as _f\n\n\ndef g():\n    return _f\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "from ..low import f\nfrom pkg.sub import b\n",
        "pkg/sub/b.py": "import json\n",
        "lit/__init__.py": "",
        "lit/cb.py": "from pkg import high\n",
        "pkg/mid.py": "from lit.cb import high\n",
    })
    graph = import_graph(tmp_path, ("pkg", "lit"))
    assert graph == {
        "pkg": {"pkg.low", "pkg.high"}, "pkg.low": {"pkg.high"}, "pkg.high": {"pkg", "pkg.low"},
        "pkg.sub": set(), "pkg.sub.a": {"pkg.low", "pkg.sub.b"}, "pkg.sub.b": set(), "lit": set(),
        "lit.cb": {"pkg.high"}, "pkg.mid": {"lit.cb"},
    }
    # the function-level import closes the one cycle; the package's imports of its children do not count
    assert import_cycles(graph) == [["pkg.high", "pkg.low", "pkg.high"]]
    floors = {"bottom": (*tree("pkg.low"), *tree("pkg.sub")), "middle": ("pkg.mid", *tree("lit")),
              "top": ("pkg", *tree("pkg.high"))}
    assert upward_imports(graph, floors, lightning_only=("lit",)) == [
        "lit.cb (middle) imports pkg.high (top)",
        "pkg.low (bottom) imports pkg.high (top)",
        "pkg.mid (middle) imports lit.cb (Lightning-only: only applications may)",
    ]
    assert unplaced_modules(graph, {k: v for k, v in floors.items() if k != "middle"}) == ["lit", "lit.cb", "pkg.mid"]
    assert floor_of("pkg.sub.a", floors) == "bottom" and floor_of("pkg.subway", floors) is None


def test_line_limit_and_outside_references_are_found(tmp_path):
    spec, env = "SP" + "EC", "ENVIRON" + "MENT.md"  # spelled apart so this file does not match itself
    write(tmp_path, {
        "pkg/__init__.py": "x = 1\n" * (MAX_LINES + 1),
        "pkg/ok.py": "x = 1\n" * MAX_LINES,
        "notes.md": f"fine\nsee {spec} §2.4 for the shape\nalso {spec} D12, ../" + f"shared/x and {env}\n",
        "data.bin": "",
    })
    (tmp_path / "data.bin").write_bytes(b"\xff\xfe" + f"{spec} §1".encode("utf-16-le"))
    assert long_files(tmp_path, ("pkg",)) == [f"pkg/__init__.py: {MAX_LINES + 1} lines"]
    found = outside_references([tmp_path / "notes.md", tmp_path / "data.bin", tmp_path / "gone.md"], tmp_path)
    assert [f.split(": ")[0] for f in found] == ["notes.md:2", "notes.md:3"]
