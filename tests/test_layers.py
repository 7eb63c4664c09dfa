"""The house's layers, read from the code's own imports: no import circle in ciscr/ or
benchmarks/, and every import goes DOWN the layer order of docs/DESIGN.md.

Every ``import`` statement counts, also those inside functions (lazy imports: still a
dependency, only a later one) and under ``if TYPE_CHECKING``. A new module must be given a
layer in :data:`LAYERS`: deciding where it sits is the point of the test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. "pkg.*" = the package and everything below it; other entries are exact.
# A module may import from its own layer or any layer below, never from a layer above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["ciscr", "ciscr.errors", "ciscr.commands"]),
    ("settings and utilities", ["ciscr.utils.*", "ciscr.dist", "ciscr.config", "ciscr.threads"]),
    ("data", ["ciscr.data.*"]),
    ("models", ["ciscr.models.*"]),
    ("the method's maths", ["ciscr.cisc"]),
    ("engine", ["ciscr.engine.*"]),
    ("run artefacts", ["ciscr.pseudo", "ciscr.selection", "ciscr.warmstart", "ciscr.loading"]),
    ("run services", ["ciscr.run_services"]),
    ("method families", ["ciscr.stage_plans", "ciscr.pipeline", "ciscr.online"]),
    ("method registry", ["ciscr.methods"]),
    ("runs", ["ciscr.run_setup", "ciscr.run_facts", "ciscr.predict_io"]),
    # the timing tools' lower half: a run's time table (the summary's and the report's) and
    # what bench and profile share; the two commands themselves are commands
    ("timing records", ["ciscr.timing", "ciscr.timing.stages", "ciscr.timing.common"]),
    ("commands", ["ciscr.runner", "ciscr.report", "ciscr.compare", "ciscr.visualize",
                  "ciscr.predict",
                  "ciscr.export", "ciscr.demo", "ciscr.timing.bench", "ciscr.timing.profiling",
                  "ciscr.timing.steptime", "ciscr.cli", "ciscr.__main__"]),
    ("benchmarks (outside the package)", ["benchmarks.*"]),
]  # fmt: skip


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module of ciscr/ and benchmarks/."""
    files = [*sorted((repo / "ciscr").rglob("*.py")), *sorted((repo / "benchmarks").glob("*.py"))]
    out = {}
    for path in files:
        parts = path.relative_to(repo).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: set[str]) -> str | None:
    """The known module a dotted import name lands in (its longest known prefix)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(tree: ast.AST, me: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules a file's import statements name, wherever they stand."""
    out: set[str] = set()

    def add(name: str) -> None:
        # Scripts in benchmarks/ import their siblings by bare name (``import camvid``:
        # benchmarks/ is on sys.path when they run).
        if me.startswith("benchmarks.") and f"benchmarks.{name.split('.')[0]}" in known:
            name = f"benchmarks.{name}"
        target = _resolve(name, known)
        if target and target != me:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                pkg = me.split(".") if is_package else me.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            for a in node.names:
                # ``from ciscr import dist`` imports the module ciscr.dist; ``from ciscr.x
                # import f`` the module ciscr.x
                full = f"{base}.{a.name}"
                add(full if full in known else base)
    return out


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of ciscr/ and benchmarks/ it imports anywhere in its code."""
    files = module_files(repo)
    known = set(files)
    return {me: _imported(ast.parse(path.read_text(), str(path)), me,
                          path.name == "__init__.py", known)
            for me, path in files.items()}  # fmt: skip


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle: the strongly connected components with more than one module (or a
    module importing itself), each sorted (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in graph.get(v, ()):
                    cycles.append(sorted(comp))
    return cycles


def layer_of(module: str, layers: list[tuple[str, list[str]]] = LAYERS) -> int | None:
    for i, (_, patterns) in enumerate(layers):
        for p in patterns:
            if module == p or (p.endswith(".*") and (module == p[:-2]
                                                    or module.startswith(p[:-1]))):
                return i
    return None


def upward_imports(graph: dict[str, set[str]],
                   layers: list[tuple[str, list[str]]] = LAYERS) -> list[str]:
    """Every import of a module from a HIGHER layer, as readable lines."""
    bad = []
    for me, deps in sorted(graph.items()):
        mine = layer_of(me, layers)
        for dep in sorted(deps):
            theirs = layer_of(dep, layers)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{me} ({layers[mine][0]}) imports {dep} ({layers[theirs][0]})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_circles(graph):
    assert find_cycles(graph) == []


def test_every_module_has_a_layer(graph):
    assert [m for m in sorted(graph) if layer_of(m) is None] == [], "add it to LAYERS"


def test_imports_go_down_the_layers(graph):
    assert upward_imports(graph) == []


def test_the_graph_sees_lazy_and_sibling_imports(graph):
    # What the checks above rely on: an import inside a function counts, and a benchmark
    # script's bare ``import archive`` is benchmarks/archive.py.
    assert "ciscr.pipeline" in graph["ciscr.methods"]  # lazy, inside _stagewise
    assert "benchmarks.archive" in graph["benchmarks.camvid"]
    assert "ciscr.dist" in graph["ciscr.engine.train"]  # from ciscr import dist


def test_the_checks_fail_on_a_circle_and_an_upward_import(tmp_path):
    # A toy tree with a circle a -> b -> a and a lower module importing a higher one.
    pkg = tmp_path / "ciscr"
    pkg.mkdir()
    (tmp_path / "benchmarks").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from ciscr.high import g\n")
    (pkg / "high.py").write_text("from ciscr import low\n")
    (pkg / "a.py").write_text("import ciscr.b\n")
    (pkg / "b.py").write_text("from ciscr.a import x\n")
    toy = import_graph(tmp_path)
    assert find_cycles(toy) == [["ciscr.a", "ciscr.b"], ["ciscr.high", "ciscr.low"]]
    layers = [("bottom", ["ciscr", "ciscr.low", "ciscr.a", "ciscr.b"]), ("top", ["ciscr.high"])]
    assert upward_imports(toy, layers) == ["ciscr.low (bottom) imports ciscr.high (top)"]


def unmapped_modules(design: str, files: dict[str, Path]) -> list[str]:
    """The modules not named in the first code block of DESIGN.md (the module map): a module
    of ciscr/ as its file name (``io.py``), a script of benchmarks/ as its name
    (``camvid_report``), each as a whole word, so that ``run`` inside "run directory" does not
    count as naming ``run.py``. Package ``__init__``/``__main__`` files are not listed there."""
    block = design.split("```")[1]

    def named(module: str, f: Path) -> bool:
        word = f.stem if module.startswith("benchmarks.") else f.name
        return re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", block) is not None

    return [m for m, f in sorted(files.items())
            if f.name not in ("__init__.py", "__main__.py") and not named(m, f)]  # fmt: skip


def test_design_md_maps_every_module():
    design = (REPO / "docs" / "DESIGN.md").read_text()
    assert unmapped_modules(design, module_files()) == [], "add it to docs/DESIGN.md's map"


def test_the_map_check_fails_on_a_module_it_does_not_name(tmp_path):
    files = {"ciscr.named": tmp_path / "named.py", "ciscr.newcomer": tmp_path / "newcomer.py",
             "ciscr.run": tmp_path / "run.py", "benchmarks.camvid": tmp_path / "camvid.py"}
    # "run" only inside other words and "camvid" only inside camvid_report: neither is named
    design = "intro\n```\nnamed.py  a run directory, runner.py\ncamvid_report\n```\n"
    assert unmapped_modules(design, files) == ["benchmarks.camvid", "ciscr.newcomer", "ciscr.run"]
