"""Check the import structure of hf_efficiency (run in CI):

    python tools/check_imports.py

1. No module imports a private name (``_name``) from another module of the package.
2. No import cycle among the package's parts. A part is a sub-package (``quant.core``,
   ``integration``, ``formats``, ...) or a top-level module (``config``, ``data``, ...); every
   import counts, at module level or inside a function, except those under ``if TYPE_CHECKING:``.
   The package's own ``__init__`` (the public facade) is not a part.
3. The method packages never import the integration layer: only ``integration`` itself, the
   facade, the CLI and ``hub`` (which wires pushes) may import ``hf_efficiency.integration``.

Exits 1 and prints each violation; prints a one-line summary when all is well.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_efficiency"
MAY_IMPORT_INTEGRATION = ("integration", "cli", "hub")


def module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def part_of(module: str, packages: set[str]) -> str | None:
    """The part a module belongs to: its deepest sub-package, or itself for a top-level module."""
    if module == PACKAGE:
        return None
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        candidate = ".".join(parts[:k])
        if candidate in packages and candidate != PACKAGE:
            return candidate[len(PACKAGE) + 1 :]
    return parts[1] if len(parts) > 1 else None


def resolve(current: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join(base + ([target] if target else []))


def type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    for sub in ast.walk(child):
                        skip.add(id(sub))
    return skip


def main() -> int:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f)[0] for f in files}
    packages = {module_name(f)[0] for f in files if f.name == "__init__.py"}
    problems: list[str] = []
    edges: dict[str, dict[str, str]] = {}
    for f in files:
        current, is_pkg = module_name(f)
        tree = ast.parse(f.read_text(), str(f))
        skip = type_checking_nodes(tree)
        src_part = part_of(current, packages)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[tuple[str, list[str]]] = []
            if isinstance(node, ast.ImportFrom):
                base = resolve(current, is_pkg, node.level, node.module)
                names = [a.name for a in node.names]
                targets.append((base, names))
            elif isinstance(node, ast.Import):
                targets.extend((a.name, []) for a in node.names)
            for base, names in targets:
                if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
                where = f"{f.relative_to(ROOT)}:{node.lineno}"
                imported = [base]
                for name in names:
                    full = f"{base}.{name}"
                    if full in modules:
                        imported.append(full)
                    elif name.startswith("_") and not name.startswith("__") and base != current:
                        problems.append(f"{where}: imports private name {name!r} from {base}")
                for target in imported:
                    dst_part = part_of(target, packages)
                    if src_part is None or dst_part is None or dst_part == src_part:
                        continue
                    edges.setdefault(src_part, {}).setdefault(dst_part, where)
                    top = src_part.split(".")[0]
                    if dst_part.split(".")[0] == "integration" and top not in MAY_IMPORT_INTEGRATION:
                        problems.append(f"{where}: {src_part} imports the integration layer ({target})")
    problems.extend(find_cycles(edges))
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} import problem(s)")
        return 1
    n_edges = sum(len(v) for v in edges.values())
    print(
        f"imports ok: {len(files)} modules, {len(edges)} parts with {n_edges} dependencies, no cycle, no private import"
    )
    return 0


def find_cycles(edges: dict[str, dict[str, str]]) -> list[str]:
    """Strongly connected components of more than one part, each with one example edge per link."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[str] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                members = set(component)
                links = [
                    f"    {a} -> {b} ({where})"
                    for a in sorted(members)
                    for b, where in sorted(edges.get(a, {}).items())
                    if b in members
                ]
                out.append(f"import cycle among {', '.join(sorted(members))}:\n" + "\n".join(links))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
