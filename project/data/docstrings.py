"""Real English technical prose with no download: the docstrings of installed Python packages."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from project.config import ConfigError
from project.data.source import check_fraction, check_split

DEFAULT_PACKAGES = ("torch", "numpy", "scipy", "matplotlib", "pyarrow", "lightning", "datasets", "lm_eval", "torchmetrics")
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class DocstringSource:
    """Every module, class and function docstring of `packages` (as installed), at least `min_chars` long,
    de-duplicated, in a fixed order (package, file path, position). A document goes to val when the hash of
    its text falls in the `val_fraction` slice, so the split does not depend on order or package versions.
    The cache key holds each package's version: another version is another corpus."""

    kind = "docstrings"

    def __init__(self, packages: Iterable[str] = DEFAULT_PACKAGES, min_chars: int = 200,
                 val_fraction: float = 0.02) -> None:  # fmt: skip
        check_fraction(val_fraction)
        self.packages = list(packages)
        if not self.packages:
            raise ConfigError("DocstringSource needs at least one package (data.source.packages=[...])")
        if min_chars < 1:
            raise ConfigError(f"data.source.min_chars must be >= 1, got {min_chars}")
        self.min_chars = min_chars
        self.val_fraction = val_fraction
        self.roots = {name: package_root(name) for name in self.packages}

    def describe(self) -> dict[str, Any]:
        return {
            "packages": {name: package_version(name) for name in self.packages},
            "min_chars": self.min_chars,
            "val_fraction": self.val_fraction,
        }

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        want_val = split == "val"
        for doc in self._all:
            if self._is_val(doc) == want_val:
                yield doc

    @functools.cached_property
    def _all(self) -> list[str]:
        """Every document, parsed once (tens of MB) and shared by the tokenizer and both splits."""
        return list(self._all_documents())

    def _is_val(self, doc: str) -> bool:
        digest = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big")
        return digest < self.val_fraction * 2**64

    def _all_documents(self) -> Iterator[str]:
        seen: set[bytes] = set()
        for name in self.packages:
            for path in sorted(self.roots[name].rglob("*.py")):
                for doc in file_docstrings(path):
                    key = hashlib.sha256(doc.encode()).digest()
                    if len(doc) >= self.min_chars and key not in seen:
                        seen.add(key)
                        yield doc


def package_root(name: str) -> Path:
    """The installed package's folder; a clear error when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (data.source.packages lists installed packages)")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(name: str) -> str:
    """The installed distribution's version (the import name's top-level distribution), else 'unknown'."""
    dists = importlib.metadata.packages_distributions().get(name) or [name]
    try:
        return importlib.metadata.version(dists[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_docstrings(path: Path) -> list[str]:
    """The file's docstrings in source order, cleaned by inspect's rules; [] if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc.strip())
    return out
