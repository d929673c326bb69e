#!/usr/bin/env python3
# The dependency graph of the project's top-level packages, from the imports in the code (grimp,
# which import-linter uses): one line per package with the packages it imports (with --counts: and
# how many import statements, function-level ones included, that takes), then whether the graph
# has a cycle. docs/architecture.md shows the output without counts; tests/test_layers.py checks
# that it is current and acyclic.
#   .venv/bin/python scripts/package_graph.py [--counts]      (from the repository root)
# Exit status 1 when the packages import each other in a cycle.
import sys
from pathlib import Path

import grimp

PACKAGES = ("mailhub", "relay", "directory", "quotas", "storage", "loadtest", "bench")


def package_edges() -> dict[str, dict[str, int]]:
    """{importer: {imported: number of imports}} between the top-level packages."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges: dict[str, dict[str, int]] = {p: {} for p in PACKAGES}
    for module in graph.modules:
        importer = module.split(".")[0]
        for imported in graph.find_modules_directly_imported_by(module):
            target = imported.split(".")[0]
            if target != importer:
                count = len(graph.get_import_details(importer=module, imported=imported)) or 1
                edges[importer][target] = edges[importer].get(target, 0) + count
    return edges


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """A cycle of packages (first package repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(edges.get(node, {})):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in PACKAGES:
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def render(edges: dict[str, dict[str, int]], counts: bool = False) -> str:
    lines = []
    for package in PACKAGES:
        targets = ", ".join(
            t + (f" ({n})" if counts else "")
            for t, n in sorted(edges[package].items(), key=lambda e: PACKAGES.index(e[0]))
        )
        lines.append(f"{package:<10} -> {targets or '(nothing of the project)'}")
    cycle = find_cycle(edges)
    lines.append("cycle: " + " -> ".join(cycle) if cycle else "no cycle")
    return "\n".join(lines)


def main() -> int:
    edges = package_edges()
    print(render(edges, counts="--counts" in sys.argv[1:]))
    return 1 if find_cycle(edges) else 0


if __name__ == "__main__":
    sys.exit(main())
