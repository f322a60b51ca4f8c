"""The layering of cf/ (docs/architecture.md), checked on the source: no part imports what it must never.

Every module under cf/ is parsed with `ast`; every import counts, at module level or inside a function
(a lazy import is still a dependency). The rules are the data below, written once; the document explains
them. A new violation fails with the file, the line and the rule's reason.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cf"

# The library's parts (module prefixes), bottom to top. The CLI and the pipeline sit on top of them.
CLI = ("cf.cli", "cf.commands")
ORCHESTRATION = ("cf.pipeline", "cf.stages", "cf.stage_cache", "cf.ablation", "cf.results", "cf.progress")
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
for _leaf in ("cf.errors", "cf.registry", "cf.utils", "cf.faults", "cf.filecheck", "cf.video", "cf.compat"):
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

