"""Import layers, read from the source with `ast` (nothing is imported):

    kernels/              imports nothing from polar_dist (the kernels stand alone)
    polar_dist/parallel/  imports nothing from the layers built on it: polar_dist.models, .engine,
                          .sparsity, .server, .runtime (it may use polar_dist.config, .errors, .envs,
                          .log and a leaf module holding the model shape)
    polar_dist.{config, errors, envs, log}, what parallel may use, import none of those layers either

Every import statement counts, also one inside a function: a deferred import is still a dependency.
A failure lists every offending file:line and import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE_PARALLEL = ("polar_dist.models", "polar_dist.engine", "polar_dist.sparsity", "polar_dist.server",
                  "polar_dist.runtime")
PARALLEL_MAY_USE = ("config", "errors", "envs", "log")


def module_name(path: Path, root: Path = ROOT) -> str:
    """kernels/dispatch.py -> kernels.dispatch; polar_dist/parallel/__init__.py -> polar_dist.parallel."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, set[str]]]:
    """(line, statement, absolute module names it imports) for every import statement in the file.
    `from a import b` names `a` and `a.b` (b may be a submodule); relative imports are resolved
    against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from ..x import y`: level 1 is this package, each further dot one up
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = {base} | {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}
        else:
            continue
        found.append((node.lineno, ast.unparse(node), names))
    return sorted(found, key=lambda item: item[0])


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def offences(files: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """'file:line: statement' for every import statement that names a forbidden package."""
    return [f"{path.relative_to(root)}:{line}: {statement}"
            for path in files for line, statement, names in imports(path, root)
            if any(within(name, forbidden) for name in names)]


def sources(directory: str) -> list[Path]:
    files = sorted((ROOT / directory).rglob("*.py"))
    assert files, f"no Python files under {directory}/"
    return files


def test_kernels_import_nothing_from_polar_dist() -> None:
    bad = offences(sources("kernels"), ("polar_dist",))
    assert not bad, "kernels/ must not import polar_dist:\n" + "\n".join(bad)


def test_parallel_imports_no_layer_above_it() -> None:
    bad = offences(sources("polar_dist/parallel"), ABOVE_PARALLEL)
    assert not bad, "polar_dist/parallel/ must not import " + ", ".join(ABOVE_PARALLEL) + ":\n" + "\n".join(bad)


@pytest.mark.parametrize("name", PARALLEL_MAY_USE)
def test_modules_parallel_uses_import_no_layer_above_it(name: str) -> None:
    bad = offences([ROOT / f"polar_dist/{name}.py"], ABOVE_PARALLEL)
    assert not bad, f"polar_dist.{name} is used by polar_dist.parallel, so it must not import:\n" + "\n".join(bad)


def test_imports_are_resolved(tmp_path: Path) -> None:
    """The scanner sees absolute, relative, `from pkg import module` and deferred imports."""
    source = tmp_path / "polar_dist/parallel/x.py"
    source.parent.mkdir(parents=True)
    source.write_text("import os\nfrom . import comm\nfrom ..engine import plan\nfrom polar_dist import runtime\n"
                      "def f():\n    import polar_dist.models.spec as s\n")
    assert offences([source], ABOVE_PARALLEL, tmp_path) == [
        "polar_dist/parallel/x.py:3: from ..engine import plan",
        "polar_dist/parallel/x.py:4: from polar_dist import runtime",
        "polar_dist/parallel/x.py:6: import polar_dist.models.spec as s",
    ]
    assert [names for _, _, names in imports(source, tmp_path)][:2] == [
        {"os"}, {"polar_dist.parallel", "polar_dist.parallel.comm"}]
