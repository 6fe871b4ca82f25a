"""The layout's import rules (docs/architecture.md, "Layout"): a file's folder says what it may touch.

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"secure_mor": "secure_mor", "clients": "clients", "server": "server", "crypto": "crypto",
         "authority": "authority", "audits": "audits", "experiments": "experiments"}  # fmt: skip
ROLES = {"clients", "server", "authority"}
ENTRY_POINTS = {"cli.py", "clientapp.py"}  # the shared package's wiring of the roles (the CLI, Flower's ClientApp)

# room -> rooms it must never import
FORBIDDEN = {
    "server": {"clients", "authority", "audits", "experiments"},
    "clients": {"server", "authority", "audits", "experiments"},
    "authority": {"server", "clients", "audits", "experiments"},
    "crypto": {"secure_mor", "server", "clients", "authority", "audits", "experiments"},
    "audits": ROLES | {"experiments"},
    "secure_mor": ROLES | {"audits", "experiments"},
}


def imported_rooms(path: Path) -> dict[str, int]:
    """{room: first line} of every secure_mor import in the file; the shared package counts as 'secure_mor'."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "secure_mor":
                continue
            room = parts[1] if len(parts) > 1 and parts[1] in ROOMS and parts[1] != "secure_mor" else "secure_mor"
            found.setdefault(room, node.lineno)
    return found


def violations(room: str, folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.py")):
        if room == "secure_mor" and path.name in ENTRY_POINTS:
            continue
        for other, line in imported_rooms(path).items():
            if other != room and other in FORBIDDEN[room]:
                module = "secure_mor" if other == "secure_mor" else f"secure_mor.{other}"
                out.append(f"{folder.name}/{path.name}:{line} imports {module}")
    return out


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_a_room_imports_only_what_its_place_allows(room):
    assert violations(room, ROOT / ROOMS[room]) == []


def test_the_rule_check_catches_a_forbidden_import(tmp_path):
    (tmp_path / "leak.py").write_text("def f():\n    from secure_mor.clients.node import ClientNode\n")
    (tmp_path / "fine.py").write_text("from secure_mor.crypto.signing import Signer\nimport numpy\n")
    leak = f"{tmp_path.name}/leak.py:2 imports secure_mor.clients"
    assert violations("server", tmp_path) == [leak]
    assert violations("crypto", tmp_path) == [leak]
    (tmp_path / "shared.py").write_text("from secure_mor import data\n")
    assert f"{tmp_path.name}/shared.py:1 imports secure_mor" in violations("crypto", tmp_path)


def test_every_room_is_checked():
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(ROOMS.values())
