"""Two layers, one direction: the library never imports a study (DESIGN.md, "Architecture").

The studies are ``mergelab.demo`` and ``mergelab.studies``; ``cli.py`` is the front end over
both. Every other module is library, and none of them may import a study, at module level or
inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mergelab"
STUDIES = ("mergelab.demo", "mergelab.studies")
ABOVE_THE_LIBRARY = ("demo", "studies", "cli.py")


def library_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py")
                  if path.relative_to(PACKAGE).parts[0] not in ABOVE_THE_LIBRARY)


def module_name(path: Path) -> str:
    parts = ("mergelab", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` (the text of ``module``),
    wherever it stands; ``from X import y`` counts as X and as X.y (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def imports_of(path: Path) -> list[tuple[int, str]]:
    return imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")


def is_study(name: str) -> bool:
    return any(name == study or name.startswith(study + ".") for study in STUDIES)


def test_the_rule_sees_every_kind_of_import():
    source = ("import mergelab.demo.world\nfrom mergelab import studies\nimport mergelab.engine\n"
              "def f():\n    from mergelab.demo.tiny import train\n    from ..studies import digits\n")
    names = [name for _, name in imported_modules(source, "mergelab.evaluate.probe")]
    assert [n for n in names if is_study(n)] == ["mergelab.demo.world", "mergelab.studies", "mergelab.demo.tiny",
                                                 "mergelab.demo.tiny.train", "mergelab.studies",
                                                 "mergelab.studies.digits"]


def test_the_library_has_modules_to_check():
    names = {module_name(path) for path in library_modules()}
    assert {"mergelab.engine", "mergelab.continual.stream", "mergelab.lm", "mergelab.fisher"} <= names
    assert not any(is_study(name) or name == "mergelab.cli" for name in names)


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_library_module_imports_a_study(path):
    offending = [f"line {line}: {name}" for line, name in imports_of(path) if is_study(name)]
    assert not offending, f"{path.relative_to(PACKAGE)} imports a study: {offending}"
