"""The tree shows the architecture, and the words about it are true: every module a doc or
a docstring names exists, every module is in the README's layout and DEVELOPING.md's table,
modules stay small, and no module reaches into another's private names."""
from __future__ import annotations

import ast
import re

import pytest

from embed_helpers.constants import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "embed_helpers"
DOCS = {name: (PROJECT_ROOT / name).read_text() for name in ("README.md", "GUIDE.md", "DEVELOPING.md")}
MODULES = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
SOURCES = {p: (PACKAGE / p).read_text() for p in MODULES}


def named_files(text: str) -> set[str]:
    """`x.py`, `pkg/x.py` and `embed_helpers.x` as a text names them."""
    names = set(re.findall(r"`([\w/]+\.py)`", text))
    names |= {m.replace(".", "/") + ".py" for m in re.findall(r"\bembed_helpers\.([a-z_]\w*(?:\.[a-z_]\w*)*)\b", text)}
    return names


def exists(name: str) -> bool:
    name = name.removeprefix("embed_helpers/")
    candidates = [PACKAGE / name, PROJECT_ROOT / name, PROJECT_ROOT / "tests" / name,
                  PROJECT_ROOT / "bench" / name]
    if any(c.is_file() for c in candidates) or ("/" not in name and any(PACKAGE.rglob(name))):
        return True
    # `embed_helpers.module.attribute`: the module part exists
    parts = name.removesuffix(".py").split("/")
    return any((PACKAGE / "/".join(parts[:k])).with_suffix(".py").is_file() or
               (PACKAGE / "/".join(parts[:k]) / "__init__.py").is_file()
               for k in range(1, len(parts)))


@pytest.mark.parametrize("where", [*DOCS, *MODULES])
def test_every_module_a_text_names_exists(where):
    text = DOCS.get(where) or SOURCES[where]
    missing = sorted(n for n in named_files(text) if not exists(n))
    assert missing == [], f"{where} names modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", ["README.md", "DEVELOPING.md"])
def test_every_module_is_in_the_layout(doc):
    text = DOCS[doc]
    listed = {n for n in MODULES if f"`{n.rsplit('/', 1)[-1]}`" in text or n in text
              or ("/" in n and f"{n.rsplit('/', 1)[0]}/" in text)}
    assert sorted(set(MODULES) - listed - {"__init__.py", "__main__.py"}) == []


def test_modules_stay_small():
    big = {m: SOURCES[m].count("\n") for m in MODULES if SOURCES[m].count("\n") > 300}
    assert big == {}


def test_no_module_imports_another_modules_private_names():
    found = []
    for name, text in SOURCES.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{name}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.value.id not in ("self", "cls", "os", "sys", "np") \
                    and node.value.id[0].islower() and _is_module(node.value.id):
                found.append(f"{name}: {node.value.id}.{node.attr}")
    assert found == []


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()
