"""The layer rule: imports only go down, and no module imports itself back (no cycles).

A top-level module is a command, a sub-package is a layer, declared in order in
:data:`LAYERS`. The walk reads every ``.py`` file's AST, so imports inside functions (and under
``if TYPE_CHECKING:``) count like any other: a cycle hidden in function-level imports is
still a cycle. ``import pneumoloc.a.b`` is an edge to ``pneumoloc.a.b`` only; the package
``__init__`` it runs on the way is not counted (Python's own packages do that everywhere).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pneumoloc

# Lowest first. A module may import its own layer (the same top-level name) or any layer of an
# earlier row, never one of its own row or a later one (so one command never imports another).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "_runtime", "_compat", "weights"),  # base: no pneumoloc imports
    ("io",),
    ("data",),
    ("models",),
    ("cam",),
    ("localise",),
    ("inference",),
    ("metrics",),
    ("report",),
    ("training",),
    # commands; `demo` runs train + evaluate, `cli` dispatches to every command
    (
        "train",
        "selftrain",
        "calibrate",
        "calibrate_ood",
        "ensemble",
        "evaluate",
        "submit",
        "predict",
        "export",
        "quantize",
        "serve",
        "listen",
    ),
    ("demo",),
    ("cli",),
    ("__main__",),
)

# pneumoloc 0.1's flat modules, now aliases of their new homes (see pneumoloc._compat): they
# sit above everything and nothing inside the package may import them.
DEPRECATED = (
    "augment",
    "boxes",
    "checkpoint",
    "config",
    "distributed",
    "lungs",
    "recipe",
    "refine",
)

PACKAGE_ROOT = Path(pneumoloc.__file__).parent


def module_names(root: Path, package: str = "pneumoloc") -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The pneumoloc modules ``module`` (the file ``path``) imports, at any depth in its AST."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one.
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "pneumoloc" or target.startswith("pneumoloc."):
                # Keep the longest known module ("pneumoloc.io.reader.X" -> "pneumoloc.io.reader").
                first = ".".join(target.split(".")[:2])
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target == "pneumoloc" and first != "pneumoloc":
                    target = first  # a name that is no module here: keep its layer visible
                if target != module:
                    found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the pneumoloc modules it imports."""
    files = module_names(root)
    names = set(files)
    return {m: imports_of(p, m, names) for m, p in files.items()}


def layer_of(module: str) -> str:
    """The top-level name a module belongs to ("pneumoloc.io.reader" -> "io")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank_of(layer: str) -> int | None:
    for rank, names in enumerate(LAYERS):
        if layer in names:
            return rank
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up (or sideways, within a row) or to an undeclared layer."""
    problems = []
    for module, targets in sorted(graph.items()):
        source = layer_of(module)
        if source in DEPRECATED:
            continue
        src_rank = rank_of(source)
        if src_rank is None:
            problems.append(f"{module}: its layer {source!r} is not declared in LAYERS")
            continue
        for target in sorted(targets):
            layer = layer_of(target)
            if layer in DEPRECATED:
                problems.append(f"{module} imports the deprecated alias {target}")
                continue
            rank = rank_of(layer)
            if rank is None:
                problems.append(f"{module} imports {target}, whose layer is not declared")
            elif rank > src_rank:
                problems.append(f"{module} ({source}) imports {target} ({layer}): upward")
            elif rank == src_rank and layer != source:
                problems.append(f"{module} ({source}) imports {target} ({layer}): sideways")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --- the rule holds for pneumoloc ---------------------------------------------------------


def test_no_import_goes_up_a_layer() -> None:
    problems = upward_imports(import_graph(PACKAGE_ROOT))
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(import_graph(PACKAGE_ROOT))
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_every_top_level_name_is_declared() -> None:
    names = {p.stem if p.is_file() else p.name for p in PACKAGE_ROOT.iterdir()}
    names = {n for n in names if not n.startswith((".", "__pycache__")) and n != "py"}
    names.discard("py")
    undeclared = {
        n
        for n in names
        if rank_of(n) is None and n not in DEPRECATED and n not in ("py.typed", "static")
    }
    assert not undeclared, f"not in LAYERS: {sorted(undeclared)}"


# --- the checker itself can fail --------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pneumoloc" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pneumoloc"


def test_checker_finds_a_cycle_hidden_in_function_imports(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "inference/__init__.py": "",
            "inference/core.py": "def f():\n    from pneumoloc.selftrain import g\n",
            "selftrain.py": "from pneumoloc.inference.core import f\n",
        },
    )
    graph = import_graph(root)
    assert cycles(graph) == [["pneumoloc.inference.core", "pneumoloc.selftrain"]]
    assert any("upward" in p for p in upward_imports(graph))


def test_checker_finds_upward_and_relative_imports(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "localise/__init__.py": "",
            "metrics/__init__.py": "",
            "metrics/localisation.py": "",
            "localise/boxes.py": "from ..metrics.localisation import x\n",
            "localise/lungs.py": "from . import boxes\n",
            "io/__init__.py": "",
            "io/reader.py": "if False:\n    import pneumoloc.boxes\n",
        },
    )
    graph = import_graph(root)
    assert graph["pneumoloc.localise.lungs"] == {"pneumoloc.localise.boxes"}
    problems = upward_imports(graph)
    assert any(
        "localise.boxes (localise) imports pneumoloc.metrics.localisation" in p for p in problems
    )
    assert any("deprecated alias pneumoloc.boxes" in p for p in problems)
    assert not cycles(graph)


# --- what importing a layer costs -----------------------------------------------------------


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module", ["pneumoloc.localise.boxes", "pneumoloc.localise.geometry", "pneumoloc.io"]
)
def test_light_layers_load_no_heavy_libraries(module: str) -> None:
    loaded = _loaded_after(f"import {module}")
    heavy = {"sklearn", "pandas", "matplotlib", "torch"} & {m.split(".")[0] for m in loaded}
    assert not heavy, f"import {module} loads {sorted(heavy)}"


def test_cli_help_loads_no_heavy_libraries() -> None:
    loaded = _loaded_after("import pneumoloc.cli")
    heavy = {"sklearn", "pandas", "matplotlib", "torch", "timm"} & {m.split(".")[0] for m in loaded}
    assert not heavy, f"import pneumoloc.cli loads {sorted(heavy)}"


# --- old import paths (one release) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("pneumoloc.boxes", "cam_to_boxes", "pneumoloc.localise.boxes"),
        ("pneumoloc.lungs", "estimate_lung_mask", "pneumoloc.localise.lungs"),
        ("pneumoloc.refine", "refine_heatmaps", "pneumoloc.localise.refine"),
        ("pneumoloc.checkpoint", "load_checkpoint", "pneumoloc.models.checkpoint"),
        ("pneumoloc.config", "TrainConfig", "pneumoloc.training.config"),
        ("pneumoloc.distributed", "init_distributed", "pneumoloc.training.distributed"),
        ("pneumoloc.augment", "augment_batch", "pneumoloc.training.augment"),
        ("pneumoloc.augment", "standardise", "pneumoloc.io.preprocess"),
        ("pneumoloc.inference", "OnnxPredictor", "pneumoloc.inference.onnx_backend"),
        ("pneumoloc.inference", "prediction_overlay", "pneumoloc.report.overlay"),
    ],
)
def test_old_import_paths_warn_and_work(old: str, name: str, new: str) -> None:
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old}.{name} moved to {new}")):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_old_paths_renamed_or_removed_say_what_to_use() -> None:
    import pneumoloc.augment
    import pneumoloc.inference
    import pneumoloc.recipe
    from pneumoloc.inference.recipe import DEFAULT_INFERENCE_RECIPE
    from pneumoloc.io.preprocess import to_model_input

    with pytest.warns(DeprecationWarning, match="to_model_input"):
        assert pneumoloc.augment.normalise is to_model_input
    with pytest.warns(DeprecationWarning):  # 0.1's recipes were plain dicts
        assert DEFAULT_INFERENCE_RECIPE.to_meta() == pneumoloc.recipe.DEFAULT_INFERENCE_RECIPE
    with pytest.raises(AttributeError, match="removed with the layered layout"):
        _ = pneumoloc.inference.stored_recipe
    with pytest.raises(AttributeError, match="has no attribute"):
        _ = pneumoloc.inference.no_such_name
    from pneumoloc.inference import Predictor  # the main name stays where it was

    assert Predictor.__module__ == "pneumoloc.inference.torch_backend"


def test_every_folder_of_code_is_a_package() -> None:
    # A folder of modules without __init__.py imports in a checkout (namespace package) but
    # setuptools' find_packages leaves it out of the wheel.
    missing = [
        str(d.relative_to(PACKAGE_ROOT))
        for d in PACKAGE_ROOT.rglob("*")
        if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").is_file()
    ]
    assert not missing, f"folders of modules without __init__.py: {missing}"


def test_predict_on_the_onnx_path_loads_no_torch_detector_or_data_frames(tmp_path: Path) -> None:
    """``predict`` with ONNX Runtime pays only for what it uses: no torch (nor timm,
    torchvision's detection ops, torch._dynamo), no scikit-learn, no pandas; matplotlib only
    for the overlay's colours, which ``--no-overlay`` skips."""
    import numpy as np
    from PIL import Image

    from conftest import save_untrained_checkpoint
    from pneumoloc.export import export_onnx

    ckpt = save_untrained_checkpoint(tmp_path / "model.pt", size=64, threshold=0.5)
    onnx_path = export_onnx(ckpt, tmp_path / "model.onnx").path
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 70), np.uint8)).save(image)
    for extra, allowed in ((["--no-overlay"], set()), ([], {"matplotlib"})):
        out = tmp_path / f"out{len(extra)}"
        args = [str(image), "--out", str(out), "--model", str(onnx_path), "--quiet", *extra]
        loaded = _loaded_after(
            f"from pneumoloc.cli import main; assert main(['predict', *{args!r}]) in (0, 3)"
        )
        heavy = {"torch", "timm", "torchvision", "sklearn", "pandas", "matplotlib"} - allowed
        assert not heavy & {m.split(".")[0] for m in loaded}, sorted(
            heavy & {m.split(".")[0] for m in loaded}
        )
        assert (out / "summary.csv").is_file()
