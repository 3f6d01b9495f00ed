"""The module graph of xlip: no import circles, no upward imports, no oversized modules.

Every module under xlip/ is parsed with ``ast`` (nothing is imported, so this runs in well under a
second), and every ``import`` / ``from ... import`` of an xlip module counts, function-local ones
included: a local import hides a circle from Python, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

XLIP = Path(__file__).resolve().parents[1] / "xlip"

# Bottom to top. A module belongs to the entry that names it or its longest-named package; it may
# import modules of its own layer and of the layers below. Circles within a layer fail the circle
# test. Every module must belong to a layer: a new module is placed here on purpose.
LAYERS: list[tuple[str, ...]] = [
    ("xlip.errors", "xlip.files", "xlip.hashing"),  # no xlip imports but errors
    ("xlip.text",),  # report text: sections, NER, labels, prompts, tokenizer, labeller
    ("xlip.config",),
    ("xlip.precision", "xlip.masking"),
    # data/: a straight stack
    ("xlip.data.storage",),  # plain files and tar-shard members
    ("xlip.data.images",),  # decoding, transforms, image_problem
    ("xlip.data.manifest",),
    ("xlip.data.shards", "xlip.data.validate", "xlip.data.dataset", "xlip.data.collate",
     "xlip.data.sampler", "xlip.data.synthetic", "xlip.data.splits"),
    ("xlip.data.stream",),  # training batches streamed from shard folders
    ("xlip.data.adapters",),
    ("xlip.data",),  # the package itself (empty __init__)
    ("xlip.model",),  # includes model.weights: weight IO, below evaluation and training
    ("xlip.losses", "xlip.flops"),  # flops: the analytic count of a step
    ("xlip.optim",),  # the optimisation steps: pre-training and fine-tuning (an evaluation)
    ("xlip.eval",),
    ("xlip.api",),
    ("xlip.train",),  # eval and api are below it: evaluation never needs the trainer
    ("xlip.bench", "xlip.demo", "xlip.ablate", "xlip.suite"),
    ("xlip.cli", "xlip"),  # the package: ``xlip.XLIP`` is xlip.api's, loaded lazily
]

MAX_LINES = 800
LONG_MODULES: dict[str, str] = {}  # path -> why it may be longer (tables, say)


def module_name(path: Path) -> str:
    parts = path.relative_to(XLIP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(XLIP.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The xlip modules that ``name`` imports anywhere in its body.

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(name: str) -> int | None:
    best, level = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    return level


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_graph_reads_local_imports():
    """The parser sees imports inside functions (the way circles used to be hidden)."""
    g = graph()
    assert "xlip.api" in g["xlip"]  # ``xlip.__getattr__`` imports it inside a function
    assert "xlip.data.storage" in g["xlip.data.images"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import circles between xlip modules: " + "; ".join(
        " ↔ ".join(c) for c in found)


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"modules in no layer of tests/test_imports.py LAYERS: {missing}"


def test_no_upward_imports():
    bad = []
    for name, deps in sorted(graph().items()):
        for dep in sorted(deps):
            mine, theirs = layer_of(name), layer_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{name} imports {dep} (a higher layer)")
    assert not bad, "upward imports against LAYERS:\n" + "\n".join(bad)


def test_eval_and_api_do_not_need_the_trainer():
    """Stated on its own, though the layer order implies it."""
    bad = [f"{name} imports {dep}" for name, deps in graph().items()
           if name == "xlip.api" or name.startswith("xlip.eval")
           for dep in deps if dep.startswith("xlip.train")]
    assert not bad, bad


def test_module_size():
    long = {}
    for path in sorted(XLIP.rglob("*.py")):
        rel = path.relative_to(XLIP.parent).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_MODULES:
            long[rel] = n
    assert not long, (f"modules over {MAX_LINES} lines: {long}; split them by concern "
                      "(or, for tables, add them to LONG_MODULES with the reason)")
