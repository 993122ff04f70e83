"""The layout of docs/architecture.md ("Module map"), enforced: imports point one way, modules stay small.

Every rule reads the source with ``ast`` (imports inside functions count too), so a wrong import
fails here before it can decay the layout. Each rule names the package it constrains and what it
may not import; the module map in docs/architecture.md says why.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 400
MAX_TOP_LEVEL_LIB_MODULES = 14
WEB_FRAMEWORKS = ("fastapi", "starlette")


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in ``path``; ``from a import b`` yields ``a.b`` too."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write the absolute one"
            module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _is_within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in _modules(folder):
        for line, module in _imports(path):
            if any(_is_within(module, f) for f in forbidden) and not any(
                _is_within(module, a) for a in allowed
            ):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(found))


# (package, what it must not import, exceptions to that), as in docs/architecture.md's module map.
RULES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("lib", ("ray", "deployments", "tests", "bench", "devservers"), ()),
    (
        "lib/models",
        ("lib.accounts", "lib.sealed", "lib.http", "lib.resource_api", "lib.cli", "lib.settings",
         "lib.preflight", *WEB_FRAMEWORKS),
        (),
    ),
    (
        "lib/accounts",
        ("lib.sealed", "lib.models", "lib.http", "lib.resource_api", "lib.cli", "lib.settings",
         "lib.preflight", *WEB_FRAMEWORKS),
        (),
    ),
    (
        "lib/sealed",
        ("lib.accounts", "lib.models", "lib.http", "lib.resource_api", "lib.cli", "lib.settings",
         "lib.preflight", *WEB_FRAMEWORKS),
        (),
    ),
    (
        "lib/openai_api",
        ("lib.accounts", "lib.sealed", "lib.models", "lib.http", "lib.resource_api", "lib.cli",
         "lib.settings", "lib.preflight", *WEB_FRAMEWORKS),
        (),
    ),
    (
        "lib/http",
        ("lib.sealed", "lib.models", "lib.resource_api", "lib.cli", "lib.settings", "lib.preflight"),
        (),
    ),
    (
        # The server shares only the protocol with the node side: the wire schemas and key wrapping.
        "lib/resource_api",
        ("lib.sealed", "lib.accounts", "lib.models", "lib.cli", "lib.settings", "lib.preflight",
         "lib.http.gate"),
        ("lib.sealed.wire", "lib.sealed.keywrap", "lib.sealed.signing"),
    ),
    (
        # Metrics and logging rules are leaves: every package may call them, they call none.
        "lib/observability",
        ("lib.accounts", "lib.sealed", "lib.models", "lib.http", "lib.resource_api", "lib.cli",
         "lib.settings", "lib.preflight", *WEB_FRAMEWORKS),
        (),
    ),
    ("bench", ("tests",), ()),
    ("devservers", ("tests", "bench", "deployments"), ()),
]


@pytest.mark.parametrize(("folder", "forbidden", "allowed"), RULES, ids=[r[0] for r in RULES])
def test_imports_point_one_way(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    assert _violations(folder, forbidden, allowed) == []


def test_only_lib_http_and_the_resource_api_import_a_web_framework() -> None:
    found = [
        v for v in _violations("lib", WEB_FRAMEWORKS)
        if not v.startswith(("lib/http/", "lib/resource_api/"))
    ]
    assert found == []


def test_top_level_lib_modules_import_only_top_level_modules() -> None:
    """Packages build on the top level, never the reverse; the composition roots are the exception:
    ``settings`` composes each package's settings and ``preflight`` runs their start-up checks."""
    top_level = {p.stem for p in (ROOT / "lib").glob("*.py")} - {"__init__"}
    roots_may_import = {
        "settings": ("lib.accounts.settings", "lib.sealed.settings"),
        "preflight": ("lib.settings", "lib.sealed.catalog", "lib.sealed.settings"),
    }
    found = []
    for path in sorted((ROOT / "lib").glob("*.py")):
        for line, module in _imports(path):
            if not _is_within(module, "lib") or module == "lib":
                continue
            head = module.split(".")[1]
            allowed = roots_may_import.get(path.stem, ())
            if head not in top_level and not any(_is_within(module, a) for a in allowed):
                found.append(f"lib/{path.name}:{line} imports {module}")
    assert sorted(set(found)) == []


def test_lib_top_level_stays_small() -> None:
    modules = [p.name for p in (ROOT / "lib").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= MAX_TOP_LEVEL_LIB_MODULES, sorted(modules)


@pytest.mark.parametrize("folder", ["lib", "deployments"])
def test_no_module_is_over_the_line_bound(folder: str) -> None:
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(folder)
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert too_long == {}


def test_docstrings_cite_the_projects_own_docs() -> None:
    """A reader of the code must be able to open what it cites: docs/, never a file outside the repo."""
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for folder in ("lib", "deployments", "bench", "devservers")
        for p in _modules(folder)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "DESIGN.md" in line or "../shared" in line
    ]
    assert found == []


def test_processes_that_serve_no_sealed_model_do_not_import_boto3() -> None:
    """The application graph imports the sealed stack (boto3 and friends) only when a loader needs it."""
    code = (
        "import sys, deployments.app, deployments.model_loader, lib.cli; "
        "print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
