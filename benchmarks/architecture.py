"""Architecture figures of the package sources (issue 15): prints, asserts nothing.

    .venv/bin/python benchmarks/architecture.py [CHECKOUT]    # CHECKOUT defaults to this repository's root

Reads only files (ast, no imports of the project), so it runs on any checkout of qflux, old or new:
  1. the 15 longest functions in packages/*/src (end_lineno - lineno + 1) and how many run over 80 lines;
  2. lines (`wc -l`) of the non-test source per package;
  3. upward imports between the core's subpackages/modules (every import in the AST, the ones inside functions
     and under `if TYPE_CHECKING:` included; the latter are marked), against the layer order LAYERS;
  4. package-level cycles among the core's subpackages/modules (lazy imports included);
  5. repeated blocks: runs of >= 6 identical lines in two places (see `repeated_blocks`).
The same layer order is enforced by import-linter (root pyproject.toml, tests/test_architecture.py).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import sys
from collections import defaultdict
from pathlib import Path

CORE = Path("packages/qflux-core/src/qflux")

# Top to bottom. A name not listed is in the bottom layer ("everything else": types, errors, loss,
# model_source, hookspecs, trainer, quantizer, ...; `qflux` itself, i.e. qflux/__init__.py, too).
# A layer that does not exist yet (run, adapters) is simply empty.
# The same order as the import-linter contract in pyproject.toml ([tool.importlinter]).
LAYERS = [
    ["__main__", "testing"],
    ["cli"],
    ["run"],
    ["plugins", "importers", "plugin_api"],
    ["default_plugin"],
    ["training"],
    ["adapters"],
    ["data", "cache"],
    ["config"],
]
BOTTOM = len(LAYERS)  # the rank of everything else
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}

MIN_BLOCK = 6  # repeated blocks: at least this many identical (normalised) lines


def rank(unit: str) -> int:
    """0 is the top layer; a larger number is a lower layer."""
    return RANK.get(unit, BOTTOM)


def source_files(root: Path) -> list[Path]:
    """Non-test .py files under packages/*/src, sorted (relative to root)."""
    files = []
    for path in sorted((root / "packages").glob("*/src/**/*.py")):
        rel = path.relative_to(root)
        parts = rel.parts
        if "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts) or "tests" in parts:
            continue
        if path.name.startswith("test_") or path.name == "conftest.py":
            continue
        files.append(rel)
    return files


def package_of(rel: Path) -> str:
    return rel.parts[1]  # packages/<name>/src/...


def parse(root: Path, rel: Path) -> ast.Module:
    return ast.parse((root / rel).read_bytes(), filename=str(rel))


# ---------------------------------------------------------------------------------------------------------
# 1. function lengths


def functions(tree: ast.Module):
    """(qualified name, first line, last line) of every function and method, nested ones included."""

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                yield name, child.lineno, child.end_lineno
                yield from visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, prefix + child.name + ".")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def report_functions(root: Path, files: list[Path], trees: dict) -> None:
    rows = []
    for rel in files:
        for name, first, last in functions(trees[rel]):
            rows.append((last - first + 1, str(rel), first, last, name))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    print(f"== 1. longest functions (packages/*/src, {len(files)} files, {len(rows)} functions)")
    for i, (length, rel, first, last, name) in enumerate(rows[:15], 1):
        print(f"{i:3d}  {length:4d}  {name}  {rel}:{first}-{last}")
    for limit in (30, 50, 80):
        print(f"functions over {limit} lines: {sum(1 for r in rows if r[0] > limit)}")
    print()


# ---------------------------------------------------------------------------------------------------------
# 2. lines per package


def report_lines(root: Path, files: list[Path]) -> None:
    per_package: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rel in files:
        per_package[package_of(rel)][0] += 1
        per_package[package_of(rel)][1] += (root / rel).read_bytes().count(b"\n")
    print("== 2. lines of non-test source per package (wc -l)")
    total = 0
    for name in sorted(per_package, key=lambda n: (n != "qflux-core", n)):
        count, lines = per_package[name]
        total += lines
        print(f"{name:16s} {lines:6d} lines  {count:3d} files")
    plugins = sum(v[1] for k, v in per_package.items() if k != "qflux-core")
    print(f"{'plugins':16s} {plugins:6d} lines")
    print(f"{'all':16s} {total:6d} lines")
    print()


# ---------------------------------------------------------------------------------------------------------
# 3./4. the core's import graph


class Imports(ast.NodeVisitor):
    """Every import in a file, with its line and whether it sits under `if TYPE_CHECKING:`."""

    def __init__(self):
        self.found: list[tuple[int, str, list[str], int, bool]] = []  # line, module, names, level, typing
        self._typing = 0

    def visit_If(self, node):
        test = node.test
        typing = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self._typing += typing
        for child in node.body:
            self.visit(child)
        self._typing -= typing
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((node.lineno, alias.name, [], 0, self._typing > 0))

    def visit_ImportFrom(self, node):
        names = [alias.name for alias in node.names]
        self.found.append((node.lineno, node.module or "", names, node.level, self._typing > 0))


def core_modules(root: Path, files: list[Path]) -> dict[str, Path]:
    """Dotted name -> file, for the core's files."""
    modules = {}
    for rel in files:
        try:
            inner = rel.relative_to(CORE)
        except ValueError:
            continue
        parts = ("qflux",) + inner.with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = rel
    return modules


def unit_of(module: str) -> str:
    """The core's subpackage or top-level module a dotted name belongs to ('qflux' for qflux/__init__.py)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qflux"


def resolve(importer: str, is_package: bool, module: str, names: list[str], level: int, known: set[str]):
    """The qflux modules one import statement names (a name that is a submodule counts as that module)."""
    if level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        module = ".".join(base + ([module] if module else []))
    if module != "qflux" and not module.startswith("qflux."):
        return []
    if not names:
        return [module]
    targets = []
    for name in names:
        sub = f"{module}.{name}"
        targets.append(sub if sub in known else module)
    return list(dict.fromkeys(targets))


def core_edges(root: Path, files: list[Path], trees: dict):
    """(file, line, importer, imported, type-only) for every import from one core module of another."""
    modules = core_modules(root, files)
    known = set(modules)
    edges = []
    for importer, rel in sorted(modules.items(), key=lambda kv: str(kv[1])):
        visitor = Imports()
        visitor.visit(trees[rel])
        is_package = rel.name == "__init__.py"
        for line, module, names, level, typing in visitor.found:
            for target in resolve(importer, is_package, module, names, level, known):
                edges.append((str(rel), line, importer, target, typing))
    return edges


def upward_edges(edges):
    """The edges that point up the layer order; between two units of one layer, only when both directions exist."""
    between = [e for e in edges if unit_of(e[2]) != unit_of(e[3])]
    pairs = {(unit_of(e[2]), unit_of(e[3])) for e in between}
    upward = []
    for edge in between:
        a, b = unit_of(edge[2]), unit_of(edge[3])
        if rank(a) > rank(b) or (rank(a) == rank(b) and (b, a) in pairs):
            upward.append(edge)
    return upward


def report_upward(edges) -> None:
    upward = upward_edges(edges)
    runtime = upward_edges([e for e in edges if not e[4]])
    print("== 3. upward imports in the core (against: " + " > ".join(" | ".join(n) for n in LAYERS)
          + " > everything else)")
    for rel, line, importer, target, typing in upward:
        mark = "  [TYPE_CHECKING]" if typing else ""
        print(f"{rel}:{line}  {importer} -> {target}{mark}")
    arrows = {(e[2], e[3]) for e in upward}
    runtime_arrows = {(e[2], e[3]) for e in runtime}
    units = sorted({(unit_of(a), unit_of(b)) for a, b in arrows})
    print(f"upward imports: {len(upward)} ({len(runtime)} outside TYPE_CHECKING); "
          f"module arrows: {len(arrows)} ({len(runtime_arrows)} outside TYPE_CHECKING); "
          f"from files: {len({e[0] for e in upward})}")
    print("upward subpackage pairs: " + (", ".join(f"{a} -> {b}" for a, b in units) or "none"))
    counted = set(upward)
    sideways = [e for e in edges if unit_of(e[2]) != unit_of(e[3]) and rank(unit_of(e[2])) == rank(unit_of(e[3]))
                and rank(unit_of(e[2])) < BOTTOM and e not in counted]
    print(f"same-layer imports one way (not counted above; import-linter's `a | b` forbids them): {len(sideways)}")
    for rel, line, importer, target, typing in sideways:
        print(f"   {rel}:{line}  {importer} -> {target}" + ("  [TYPE_CHECKING]" if typing else ""))
    print()


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one node, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def elementary_cycles(graph: dict[str, set[str]], limit: int) -> list[list[str]]:
    """Simple cycles, each starting at its smallest node, shortest first; at most about `limit` of them."""
    cycles: list[list[str]] = []

    def walk(start, node, path):
        for nxt in sorted(graph.get(node, ())):
            if len(cycles) >= limit:
                return
            if nxt == start:
                cycles.append(path[:])
            elif nxt > start and nxt not in path:
                path.append(nxt)
                walk(start, nxt, path)
                path.pop()

    for start in sorted(graph):
        walk(start, start, [start])
    return sorted(cycles, key=lambda c: (len(c), c))


def report_cycles(edges, show: int) -> None:
    """Two-way pairs (A imports B and B imports A: the review's "package-level cycles"), the strongly connected
    groups they and longer loops form, and the simple cycles (the first `show`, shortest first)."""
    print("== 4. package-level cycles among the core's subpackages/modules (lazy imports included)")
    for label, chosen in (("outside TYPE_CHECKING", [e for e in edges if not e[4]]), ("all imports", edges)):
        graph: dict[str, set[str]] = defaultdict(set)
        example: dict[tuple[str, str], str] = {}
        for rel, line, importer, target, _ in chosen:
            a, b = unit_of(importer), unit_of(target)
            if a != b:
                graph[a].add(b)
                example.setdefault((a, b), f"{rel}:{line}")
        components = strongly_connected(graph)
        limit = 10000
        cycles = elementary_cycles(graph, limit)
        count = f">= {limit}" if len(cycles) >= limit else str(len(cycles))
        pairs = [c for c in cycles if len(c) == 2]
        print(f"-- {label}: {len(pairs)} two-way pair(s), {len(components)} strongly connected group(s), "
              f"{count} simple cycle(s)")
        for a, b in pairs:
            print(f"   {a} <-> {b}   ({a}->{b} {example[(a, b)]}; {b}->{a} {example[(b, a)]})")
        for component in components:
            print(f"   group of {len(component)}: {{" + ", ".join(component) + "}")
        for cycle in cycles[:show]:
            print("   cycle: " + " -> ".join(cycle + cycle[:1]))
        if len(cycles) > show:
            print(f"   ... and {count if count.startswith('>') else len(cycles) - show} more "
                  f"(--cycles N prints the first N)")
    print()


# ---------------------------------------------------------------------------------------------------------
# 5. repeated blocks


def kept_lines(root: Path, rel: Path, tree: ast.Module) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count: not blank, not a comment, not an import."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    kept = []
    for number, line in enumerate((root / rel).read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#") and number not in skip:
            kept.append((number, text))
    return kept


def repeated_blocks(root: Path, files: list[Path], trees: dict):
    """Maximal runs of >= MIN_BLOCK identical kept lines found in two places; one row per pair of places.

    Windows of MIN_BLOCK consecutive kept lines are hashed; two places that share a window are extended while
    the lines keep matching, and a pair is reported once, at the start of its run. Overlapping places in one
    file are not a repeat.
    """
    lines = {rel: kept_lines(root, rel, trees[rel]) for rel in files}
    windows: dict[bytes, list[tuple[Path, int]]] = defaultdict(list)
    for rel in files:
        texts = [t for _, t in lines[rel]]
        for i in range(len(texts) - MIN_BLOCK + 1):
            key = hashlib.sha1("\n".join(texts[i:i + MIN_BLOCK]).encode()).digest()
            windows[key].append((rel, i))
    pairs = []
    for places in windows.values():
        for (fa, ia), (fb, ib) in itertools.combinations(places, 2):
            a, b = lines[fa], lines[fb]
            if fa == fb and abs(ia - ib) < MIN_BLOCK:
                continue
            if ia > 0 and ib > 0 and a[ia - 1][1] == b[ib - 1][1]:
                continue  # not the start of the run: counted where it starts
            n = MIN_BLOCK
            while ia + n < len(a) and ib + n < len(b) and a[ia + n][1] == b[ib + n][1]:
                if fa == fb and min(ia, ib) + n >= max(ia, ib):
                    break
                n += 1
            pairs.append((str(fa), a[ia][0], a[ia + n - 1][0], str(fb), b[ib][0], b[ib + n - 1][0], n))
    return sorted(pairs)


def report_repeats(root: Path, files: list[Path], trees: dict) -> None:
    pairs = repeated_blocks(root, files, trees)
    print(f"== 5. repeated blocks (>= {MIN_BLOCK} identical lines; blank, comment and import lines ignored)")
    for fa, a0, a1, fb, b0, b1, n in pairs:
        print(f"{n:3d} lines  {fa}:{a0}-{a1} ~ {fb}:{b0}-{b1}")
    print(f"repeated-block pairs: {len(pairs)}")
    print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", nargs="?", default=str(Path(__file__).resolve().parent.parent),
                        help="the root of a qflux checkout (default: this repository)")
    parser.add_argument("--cycles", type=int, default=20, metavar="N",
                        help="print the first N simple cycles of each graph, shortest first (default 20)")
    args = parser.parse_args(argv)
    root = Path(args.checkout).resolve()
    files = source_files(root)
    if not files:
        sys.exit(f"no packages/*/src/**/*.py under {root}")
    trees = {rel: parse(root, rel) for rel in files}
    print(f"checkout: {root}")
    print()
    report_functions(root, files, trees)
    report_lines(root, files)
    edges = core_edges(root, files, trees)
    report_upward(edges)
    report_cycles(edges, args.cycles)
    report_repeats(root, files, trees)


if __name__ == "__main__":
    main()
