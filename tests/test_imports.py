"""The package's modules import each other in one direction: no circle, not even one hidden behind
TYPE_CHECKING or inside a function (issue 16: checkpoint ↔ trainer, config ↔ topology were such circles)."""

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "p2p"


def _imports() -> nx.DiGraph:
    """module -> the p2p modules it imports anywhere in its file."""
    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("p2p", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in targets:
                if target.startswith("p2p.") and target != name:
                    graph.add_edge(name, target)
    return graph


@pytest.mark.timeout(30)
def test_no_module_imports_one_that_imports_it():
    graph = _imports()
    # a package's __init__ re-exporting its own modules is not a circle: leave p2p.algorithms' children out
    inner = graph.subgraph(n for n in graph if not n.startswith("p2p.algorithms."))
    assert list(nx.simple_cycles(inner)) == []
    # the simulator and the trainer are siblings built from the same components (issue 19); the library sits below both
    for a, b in [("p2p.checkpoint", "p2p.trainer"), ("p2p.config", "p2p.topology"), ("p2p.config", "p2p.topology_files"),
                 ("p2p.sim", "p2p.trainer"), ("p2p.optimizer", "p2p.trainer"), ("p2p.network", "p2p.trainer"),
                 ("p2p.algorithms.base", "p2p.comm"), ("p2p.algorithms.base", "p2p.transport")]:
        assert not nx.has_path(graph, a, b), (a, b)
