"""What makes a stored output trustworthy enough to reuse: content hashes and sizes of files and directories,
and a hash of a stage's code (its module and every project module it imports, transitively).

``content_sha256`` of a directory is ``runtime.checkpoint.directory_sha256`` (sha256 over the sorted
``relative path \\t file sha256`` lines), reimplemented here so the CLI can check a run without importing torch.
"""

from __future__ import annotations

import ast
import hashlib
import os
import threading
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from runtime.tableio import resolve, sha256_file

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "stages", "maths", "runtime", "schemas")


class IntegrityError(ValueError):
    """A stored output does not match what the manifest recorded for it."""


# --- content -----------------------------------------------------------------------------------------------
def _local_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def content_size(uri: str) -> int | None:
    """Bytes of a file, or of every file under a directory; None when nothing is there."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return info.size
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sum(i.size for i in infos if i.type == pafs.FileType.File)
    return None


def content_sha256(uri: str, replaced: dict[str, str | None] | None = None) -> str:
    """sha256 of a file's bytes; of a directory, over its sorted (relative path, file sha256) pairs. ``replaced``
    (local directories): the directory as it is about to become, by relative path: a sha256 for a file about to be
    written or replaced, None for one about to be removed (``flows.prune`` records a checkpoint's new hash before
    it changes the files)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return sha256_file(uri)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri} does not exist")
    h = hashlib.sha256()
    if isinstance(fs, pafs.LocalFileSystem):
        root = Path(path)
        entries: dict[str, str | None] = {f.relative_to(root).as_posix(): "" for f in _local_files(root)}
        entries.update(replaced or {})
        for rel in sorted(entries, key=lambda r: PurePosixPath(r).parts):  # _local_files' order: part by part
            if entries[rel] is not None:
                h.update(f"{rel}\t{entries[rel] or sha256_file(root / rel)}\n".encode())
        return h.hexdigest()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = i.path[len(path.rstrip("/")) + 1 :]
        h.update(f"{rel}\t{sha256_file(uri.rstrip('/') + '/' + rel)}\n".encode())
    return h.hexdigest()


def check_ref(uri: str, sha256: str, size: int | None) -> str | None:
    """None when ``uri`` holds what was recorded; else why not (missing, size, sha256), in a few words."""
    have_size = content_size(uri)
    if have_size is None:
        return "missing"
    if size is not None and have_size != size:
        return f"{have_size} bytes, recorded {size}"
    if content_sha256(uri) != sha256:
        return "sha256 differs from the recorded one"
    return None


_DIR_MEMO: dict[tuple, str] = {}


def dir_fingerprint(path: Path) -> str:
    """Content fingerprint of a model directory (sha256 of its files). Memoised within the process on every
    file's (name, size, mtime, inode), so an unchanged directory is hashed once per process, while a changed
    byte is seen by the next process whatever the mtimes say."""
    files = _local_files(path)
    stamp = tuple((str(f), *(lambda s: (s.st_size, s.st_mtime_ns, s.st_ino))(f.stat())) for f in files)
    key = (str(path.resolve()), stamp)
    if key not in _DIR_MEMO:
        _DIR_MEMO[key] = content_sha256(str(path))
    return _DIR_MEMO[key]


# --- code ----------------------------------------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


# CPython 3.11's parser is not thread-safe ("AST constructor recursion depth mismatch")
_PARSE = threading.Lock()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports (lazily or not), plus the packages above each (they run on import)."""
    with _PARSE:  # an asynchronous pipeline hashes stage code from two threads at once
        tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                mod = ".".join([*parts, node.module] if node.module else parts)
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t.split(".")[0] not in PACKAGES:
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if _module_file(sub):
                    found.add(sub)
    found.discard(name)
    return found


def code_closure(module: str) -> tuple[str, ...]:
    """``module`` and every project module it imports, transitively (sorted names)."""
    seen: set[str] = set()
    todo = [module, *[".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return tuple(sorted(seen))


def code_hash(module: str) -> str:
    """sha256 of the sources of ``module`` and of every project module it imports (read now, not cached, so an
    edit between two calls in one process is seen)."""
    h = hashlib.sha256()
    for name in code_closure(module):
        path = _module_file(name)
        assert path is not None
        h.update(f"{name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def inside(uri: str, base: str) -> bool:
    """Whether ``uri`` lies under the directory ``base``."""
    if is_local(uri):
        return os.path.abspath(uri).startswith(os.path.abspath(base).rstrip("/") + "/")
    return uri.startswith(base.rstrip("/") + "/")
