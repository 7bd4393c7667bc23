"""Versioned SQL migrations: the files under `migrations/<dialect>/`, in version order.

A file's name is its version (`0001_init.sql` -> `0001_init`), recorded in
`llmproxy_schema_migrations` once applied; never rename or edit a released file, add the
next one. Each dialect has the same versions (a test checks). The rules for writing one
are in `migrations/README.md`; each backend's `migrate()` applies them under its lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

DIALECTS = ("postgresql", "sqlite")
_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # the file name without `.sql`
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """The dialect's migrations, oldest first. A badly named file or two files with the
    same number is a packaging bug: ValueError naming them."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}")
    folder = resources.files(__package__) / "migrations" / dialect
    found: dict[str, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.fullmatch(entry.name)
        if match is None:
            raise ValueError(f"migration {dialect}/{entry.name}: name must look like 0001_what.sql")
        if match[1] in found:
            raise ValueError(f"migrations {dialect}: two files numbered {match[1]}")
        found[match[1]] = Migration(entry.name[: -len(".sql")], entry.read_text(encoding="utf-8"))
    return [found[number] for number in sorted(found)]
