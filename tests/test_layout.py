"""The layout WORKSPACE.md states: subpackages depend one way, and code outside a
subpackage reaches it through its face (its __init__.py) only."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "llama_jax"
# The order WORKSPACE.md states: each imports only the root modules and those above it.
ORDER = ["data", "nn", "compress", "formats", "evals", "train", "distill", "tpu"]
ROOT_MODULES = {"errors", "config", "sharding", "tree", "paths"}
OUTSIDE = ("launch", "convert", "bench")


def _imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every `from llama_jax... import names` in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "llama_jax" or node.module.startswith("llama_jax."):
                out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llama_jax"):
                    out.append((node.lineno, alias.name, []))
    return out


def _targets(module: str, names: list[str]) -> list[list[str]]:
    """The llama_jax paths an import reaches, as lists of parts after `llama_jax`."""
    parts = module.split(".")[1:]
    if parts:
        return [parts]
    return [[name] for name in names]


def _package(parts: list[str]) -> str:
    return parts[0] if parts and parts[0] in ORDER else "root"


def test_the_library_is_a_few_root_modules_and_one_subpackage_per_concept():
    modules = {p.stem for p in LIBRARY.glob("*.py")} - {"__init__"}
    assert modules == ROOT_MODULES
    packages = {p.name for p in LIBRARY.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ORDER)
    for name in ORDER:
        face = ast.parse((LIBRARY / name / "__init__.py").read_text())
        exported = next(
            n for n in face.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"
        )
        assert ast.literal_eval(exported.value), f"{name}/__init__.py exports nothing"


def test_subpackages_import_only_those_above_them():
    wrong = []
    for path in LIBRARY.rglob("*.py"):
        rel = path.relative_to(LIBRARY).parts
        if len(rel) == 1:
            if path.name == "__init__.py":
                continue  # the package's own face re-exports from below
            own = "root"
        else:
            own = rel[0]
        for line, module, names in _imports(path):
            for parts in _targets(module, names):
                other = _package(parts)
                if other == own or other == "root":
                    if own == "root" and other != "root":
                        wrong.append(f"{path}:{line} root module imports {module}")
                    continue
                if own == "root" or ORDER.index(other) > ORDER.index(own):
                    wrong.append(f"{path}:{line} {own}/ imports {other}/ ({module})")
                if len(parts) > 1:
                    wrong.append(f"{path}:{line} {own}/ reaches behind {other}/'s face: {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", OUTSIDE)
def test_entry_points_and_benchmarks_use_faces_only(folder):
    behind = []
    for path in (ROOT / folder).rglob("*.py"):
        for line, module, names in _imports(path):
            for parts in _targets(module, names):
                if _package(parts) == "root":
                    continue
                modules = LIBRARY / parts[0]
                reaches_module = len(parts) > 1 or any(
                    (modules / f"{n}.py").exists() or (modules / n).is_dir()
                    for n in (names if len(parts) == 1 and module != "llama_jax" else [])
                )
                if reaches_module:
                    behind.append(f"{path}:{line} {module} {names}")
    assert not behind, "\n".join(behind)
