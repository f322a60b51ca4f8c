"""The layering of cf/ (docs/architecture.md), checked on the source: no part imports what it must never,
no two modules import each other (directly or round a longer circle), and no module borrows another's
private names.

Every module under cf/ is parsed with `ast`; every import counts, at module level or inside a function
(a lazy import is still a dependency). The rules are the data below, written once; the document explains
them. A new violation fails with the file, the line and the rule's reason; a circle fails as the chain
of imports that closes it (`cf.a -> cf.b -> cf.a`, each step with its file and line).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cf"

# The library's parts (module prefixes), bottom to top. The CLI and the pipeline sit on top of them.
CLI = ("cf.cli", "cf.commands")
ORCHESTRATION = ("cf.pipeline", "cf.stages", "cf.stage_cache", "cf.run_records", "cf.ablation", "cf.results",
                 "cf.progress")
ABOVE_MODEL = ("cf.memory", "cf.diffusion", "cf.rollout", "cf.train", "cf.metrics", "cf.bench", "cf.tracking",
               "cf.evaluation", "cf.generation", "cf.wan")

# importer prefix -> (forbidden prefixes, why). A prefix matches the module and everything under it.
NEVER: dict[str, tuple[tuple[str, ...], str]] = {
    "cf.config": (("cf.data", "cf.model", *ABOVE_MODEL, *CLI, *ORCHESTRATION),
                  "the config is the root: it names choices (registries resolve by name at load time), "
                  "it never imports what it configures"),
    "cf.data": (("cf.model", *ABOVE_MODEL, *CLI, *ORCHESTRATION),
                "data makes clips; it knows no network, memory, noise process or training"),
    "cf.model": (("cf.data", *ABOVE_MODEL, *CLI, *ORCHESTRATION),
                 "the network knows nothing of the noise process (diffusion), caches (memory), loops "
                 "(rollout) or training: it takes scaled inputs and a read, and returns its output and kv"),
    "cf.memory": (("cf.model", "cf.data", "cf.diffusion", "cf.rollout", "cf.train", "cf.metrics",
                   "cf.bench", "cf.tracking", *CLI, *ORCHESTRATION),
                  "a memory policy decides what the cache keeps and reads; of the model it knows only the "
                  "read it hands over (cf.model.read, allowed below), never the network"),
    "cf.diffusion": (("cf.config", "cf.data", "cf.model", "cf.memory", "cf.rollout", "cf.train",
                      "cf.metrics", "cf.bench", "cf.tracking", *CLI, *ORCHESTRATION),
                     "diffusion is pure math: it takes the network as an argument and never imports it"),
    "cf.rollout": (("cf.data", "cf.train", "cf.metrics", "cf.bench", "cf.tracking", *CLI, *ORCHESTRATION),
                   "the one loop takes a model, a policy's cache and a sampler; its callers bring data"),
    "cf.train": (("cf.bench", *CLI, *ORCHESTRATION),
                 "a stage's LightningModules and runners are called by the pipeline and the CLI, not the "
                 "reverse"),
    "cf.metrics": (("cf.model", "cf.memory", "cf.diffusion", "cf.rollout", "cf.train", "cf.bench",
                    "cf.tracking", *CLI, *ORCHESTRATION),
                   "metrics score videos (torchmetrics); they never generate, train or log"),
    "cf.bench": (("cf.train", *CLI, *ORCHESTRATION),
                 "the benchmark loads generators from checkpoints; it never imports a training module"),
    "cf.wan": (("cf.train", "cf.bench", "cf.metrics", *CLI, *ORCHESTRATION),
               "Wan's readers, text encoder, VAE and generation build on the network, memory, noise process "
               "and rollout; the CLI calls them, never the reverse"),
    "cf.generation": (("cf.train", "cf.bench", *CLI, *ORCHESTRATION),
                      "one generation routine shared by the command, the stage evaluation and the benchmark"),
    "cf.evaluation": (("cf.train", "cf.bench", "cf.tracking", *CLI, *ORCHESTRATION),
                      "an evaluation scores a model and returns numbers; stage runners write and log them"),
    "cf.tracking": (("cf.data", "cf.model", "cf.memory", "cf.diffusion", "cf.rollout", "cf.train",
                     "cf.metrics", "cf.bench", *CLI, *ORCHESTRATION),
                    "tracking records what others hand it (params, metrics, artifacts)"),
}
# Shared leaf helpers: importable from anywhere, so they import no part at all.
for _leaf in ("cf.errors", "cf.registry", "cf.utils", "cf.faults", "cf.filecheck", "cf.video", "cf.compat",
              "cf.image"):
    NEVER[_leaf] = (("cf.config", "cf.data", "cf.model", *ABOVE_MODEL, *CLI, *ORCHESTRATION),
                    "a shared helper imports no part of the suite (everything may import it)")

# (importer prefix, imported module) pairs a rule above would forbid but that are the design.
ALLOWED: dict[tuple[str, str], str] = {
    ("cf.memory", "cf.model.read"): "CacheRead is the interface between the cache and the network",
}

# Violations that exist today in files of other owners, each with its fix. They are reported here so
# that nothing new joins them; remove an entry when its file is fixed.
KNOWN: dict[tuple[str, str], str] = {}

# No class in these packages may subclass torch.nn.Module: they hold no parameters or buffers.
NO_MODULE_STATE = ("cf.diffusion",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every cf import in the file, at any depth; `from cf import x` counts as cf.x."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                # `from cf import tracking` imports the module cf.tracking; `from cf.x import f` imports cf.x
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else base))
    return [(line, mod) for line, mod in out if mod == "cf" or mod.startswith("cf.")]


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(path: Path) -> list[str]:
    name = _module_name(path)
    rel = str(path.relative_to(ROOT.parent))
    found = []
    for importer, (forbidden, why) in NEVER.items():
        if not _under(name, importer):
            continue
        for line, mod in imports(path):
            bad = next((f for f in forbidden if _under(mod, f)), None)
            if bad is None or (importer, mod) in ALLOWED or (rel, mod) in KNOWN:
                continue
            found.append(f"{rel}:{line} imports {mod}: {importer} never imports {bad} ({why})")
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_forbidden_import(path):
    assert not violations(path), "\n".join(violations(path))


# --- circles and private names -------------------------------------------------------------------


def import_graph(paths: list[Path]) -> dict[str, dict[str, str]]:
    """importer -> {imported module: "file:line" of its first import}, over the modules of `paths` only.

    An import of `cf.a.b` is an edge to `cf.a.b`, not to the package `cf.a` that Python runs first: a
    package's `__init__` that imports its own submodules would otherwise close a circle with each of them.
    """
    names = {_module_name(p): p for p in paths}
    graph: dict[str, dict[str, str]] = {}
    for name, path in names.items():
        edges = graph.setdefault(name, {})
        for line, mod in imports(path):
            if mod in names and mod != name:
                edges.setdefault(mod, f"{path.relative_to(ROOT.parent)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[str]:
    """Each circle of `graph` as a readable chain, one per strongly connected component (Tarjan).

    The chain is the shortest circle through the component's first module (by name), so a component of
    many modules is reported as one concrete loop to cut, followed by its other members ("tangled").
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is bounded by the number of modules (a few hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_chain(graph, c) for c in sorted(components)]


def _chain(graph: dict[str, dict[str, str]], component: list[str]) -> str:
    """The shortest circle from component[0] back to itself (breadth first), with where each import is."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in came_from:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in members and w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    path = [start]
    while len(path) == 1 or path[-1] != start:
        path.append(came_from[path[-1]])
    path.reverse()
    where = ", ".join(graph[a][b] for a, b in zip(path, path[1:]))
    others = sorted(members - set(path))
    tangled = f"; tangled with it: {', '.join(others)}" if others else ""
    return " -> ".join(path) + f"  ({where})" + tangled


def private_imports(path: Path) -> list[str]:
    """Where the file takes a private name (`_x`, dunders aside) from another cf module: `from cf.m import
    _x`, or `m._x` on a cf module it imported (`from cf import m`, `import cf.m as m`, `import cf.m`)."""
    name = _module_name(path)
    rel = str(path.relative_to(ROOT.parent))
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    found, bound = [], {}  # bound: local name -> the cf module it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "cf" or a.name.startswith("cf."):
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not (base == "cf" or base.startswith("cf.")) or base == name:
                continue
            for a in node.names:
                if _is_module(f"{base}.{a.name}"):
                    bound[a.asname or a.name] = f"{base}.{a.name}"
                if private(a.name):
                    found.append(f"{rel}:{node.lineno} imports {a.name} from {base}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            dotted = ast.unparse(node.value)
            head, _, rest = dotted.partition(".")
            if head in bound and all(part.isidentifier() for part in dotted.split(".")):
                module = bound[head] + (f".{rest}" if rest else "")
                if module != name and _is_module(module):
                    found.append(f"{rel}:{node.lineno} uses {module}.{node.attr}")
    return found


def test_no_import_cycle():
    """Every module sits above what it uses: a circle means a type or helper lives in the wrong room
    (move it below both sides, or merge the two where they are one idea; docs/architecture.md, 1a)."""
    found = cycles(import_graph(SOURCES))
    assert not found, "import circles among cf/ modules:\n" + "\n".join(found)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_private_import(path):
    """A private name is its module's own: a helper another module needs is public, in a module below both."""
    assert not private_imports(path), "\n".join(private_imports(path))


def _package(tmp_path: Path, files: dict[str, str], monkeypatch) -> list[Path]:
    """A synthetic cf/ under tmp_path with `files` (relative path -> source); ROOT points at it."""
    for rel, text in {"cf/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "cf")
    return sorted((tmp_path / "cf").rglob("*.py"))


def test_the_cycle_checker_finds_a_circle(tmp_path, monkeypatch):
    """Two modules that import each other (one of them lazily, one relatively) are a circle; a third that
    only uses them is not in it; a package importing its own submodule is not a circle with it."""
    paths = _package(tmp_path, {
        "cf/a.py": "from cf.b import g\n",
        "cf/b.py": "def g():\n    from . import a\n",
        "cf/c.py": "from cf import a, b\n",
        "cf/p/__init__.py": "from cf.p.q import h\n",
        "cf/p/q.py": "import cf.a\ndef h():\n    pass\n",
    }, monkeypatch)
    graph = import_graph(paths)
    assert graph["cf.c"] == {"cf.a": "cf/c.py:1", "cf.b": "cf/c.py:1"}
    assert cycles(graph) == ["cf.a -> cf.b -> cf.a  (cf/a.py:1, cf/b.py:2)"]
    longer = {"cf.x": {"cf.y": "x:1"}, "cf.y": {"cf.z": "y:1", "cf.zz": "y:2"}, "cf.z": {"cf.x": "z:1"},
              "cf.zz": {"cf.y": "zz:1"}}
    assert cycles(longer) == ["cf.x -> cf.y -> cf.z -> cf.x  (x:1, y:1, z:1); tangled with it: cf.zz"]
    assert cycles({"cf.x": {"cf.y": "x:1"}, "cf.y": {}}) == []


def test_the_private_checker_finds_a_borrowed_name(tmp_path, monkeypatch):
    """`from cf.m import _x`, `m._x` after `from cf import m`, `cf.m._x` after `import cf.m`: all borrowed;
    a dunder, a private name of the module's own, and `_x` on a non-module are not."""
    paths = _package(tmp_path, {
        "cf/m.py": "_x = 1\n",
        "cf/user.py": "import cf.m\nfrom cf import __version__, m\nfrom cf.m import _x\n"
                      "def f(obj):\n    return m._x, cf.m._x, obj._x, __version__\n",
        "cf/own.py": "_y = 2\ndef f():\n    return _y\n",
    }, monkeypatch)
    user = next(p for p in paths if p.name == "user.py")
    assert private_imports(user) == [
        "cf/user.py:3 imports _x from cf.m", "cf/user.py:5 uses cf.m._x", "cf/user.py:5 uses cf.m._x",
    ]
    assert all(private_imports(p) == [] for p in paths if p.name != "user.py")


STATELESS = [p for p in SOURCES if any(_under(_module_name(p), q) for q in NO_MODULE_STATE)]


@pytest.mark.parametrize("path", STATELESS, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_diffusion_holds_no_module_state(path):
    """diffusion is functions and frozen dataclasses: a torch.nn.Module there would be network state."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            assert not any(b.split(".")[-1] == "Module" for b in bases), f"{path.name}: {node.name}{bases}"


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The parser itself: module-level, function-level, `from cf import x`, relative and aliased imports."""
    pkg = tmp_path / "cf" / "model"
    pkg.mkdir(parents=True)
    for mod in ("cf/__init__.py", "cf/model/__init__.py", "cf/diffusion/__init__.py", "cf/diffusion/x.py",
                "cf/tracking.py"):
        (tmp_path / mod).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / mod).touch()
    src = pkg / "bad.py"
    src.write_text("import cf.diffusion.x as d\n"
                   "def f():\n    from cf import tracking\n    from ..diffusion import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "cf")
    assert imports(src) == [(1, "cf.diffusion.x"), (3, "cf.tracking"), (4, "cf.diffusion.x")]
    assert len(violations(src)) == 3

