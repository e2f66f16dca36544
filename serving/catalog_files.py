"""Where a running server may read catalog files from: one directory the operator names at start-up.

A client of `POST /v1/catalog` names a file inside that directory, never a path on the server's machine:
absolute names, `..` and symbolic links that lead out of the directory are refused before anything is opened,
and what the server answers about a file never quotes its contents (only the line number of a bad record).
"""

from __future__ import annotations

import logging
import os

from homegen.data.formats import DataFormatError, read_catalog

log = logging.getLogger("homegen.serve")
MAX_NAME = 255


class CatalogRefused(Exception):
    """A catalog name or file the server will not use; `str(e)` is safe to send to the client."""


class CatalogDirectory:
    """The operator's catalog directory (resolved once, symbolic links included)."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ValueError(f"catalog directory {directory} does not exist or is not a directory")
        self.root = os.path.realpath(directory)

    def resolve(self, name: object) -> str:
        """The real path of the catalog file `name` (relative to the directory), or CatalogRefused."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name:
            raise CatalogRefused(f"'catalog' must be a file name of 1..{MAX_NAME} characters inside the server's "
                                 "catalog directory")
        if os.path.isabs(name) or name.startswith("~"):
            raise CatalogRefused("'catalog' names a file inside the server's catalog directory, not a path")
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([self.root, path]) != self.root:
            raise CatalogRefused("'catalog' leads out of the server's catalog directory")
        if not os.path.isfile(path):
            raise CatalogRefused("no such catalog file in the server's catalog directory")
        return path

    def read(self, name: object) -> tuple[str, dict]:
        """(real path, catalog records) of `name`; a malformed file is refused with its line number only."""
        path = self.resolve(name)
        try:
            return path, read_catalog(path)
        except DataFormatError as e:
            log.warning("refused catalog file: %s", e)  # the full reason stays in the operator's log
            raise CatalogRefused(f"catalog file {name!s} is not a valid catalog (FORMATS.md §2): "
                                 f"bad record on line {e.line}") from None
        except (OSError, UnicodeDecodeError) as e:
            log.warning("unreadable catalog file %s: %s", path, e)
            raise CatalogRefused(f"catalog file {name!s} cannot be read") from None
