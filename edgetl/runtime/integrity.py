"""Bundle integrity: copied into every bundle beside predict.py, and used by edgetl itself.

`manifest.json` lists the sha256 of every other file, and its own `digest`: the sha256 of its
canonical body (every key but `digest`, as sorted, compact, UTF-8 JSON). A changed file, a file
added or removed, and a changed manifest (say, its metrics raised by hand) all fail `check`.
`bundle.sig`, an optional signature over the whole folder (`edgetl sign`), is the one file the
manifest does not list. Needs only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
SIGNATURE = "bundle.sig"
UNLISTED = (MANIFEST, SIGNATURE)  # the files the manifest cannot list: itself, and a signature made after it


class IntegrityError(ValueError):
    """The bundle's files or its manifest are not what the build wrote. `problems` lists each."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(body: dict) -> bytes:
    """The manifest's bytes for its digest: keys sorted, no whitespace, UTF-8, no NaN."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def digest(manifest: dict) -> str:
    return "sha256:" + hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "digest"})).hexdigest()


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(regular files, symbolic links) under root, as sorted bundle-relative posix names; links are
    never followed (a linked folder would hide what it holds from the hashes)."""
    files, links = [], []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in [*dirs, *names]:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                links.append(rel)
            elif name in names and path.is_file():
                files.append(rel)
    return sorted(f for f in files if f not in UNLISTED), sorted(links)


def hash_tree(root: Path) -> dict[str, str]:
    """Bundle-relative posix name -> sha256 of every regular file but the unlisted ones."""
    return {rel: file_sha256(Path(root, rel)) for rel in _walk(Path(root))[0]}


def seal(manifest: dict, root: Path) -> dict:
    """The manifest with every file of `root` listed and its digest set."""
    manifest = {k: v for k, v in manifest.items() if k != "digest"}
    manifest["files"] = hash_tree(root)
    manifest["digest"] = digest(manifest)
    return manifest


def load(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing; rebuild the bundle", [f"missing: {MANIFEST}"]) from None
    except (OSError, ValueError, RecursionError) as e:
        raise IntegrityError(f"{path}: not a readable JSON manifest ({one_line(e)[:200]})",
                             [f"unreadable: {MANIFEST}"]) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path}: has no 'files' table; rebuild the bundle", [f"{MANIFEST}: incomplete"])
    return manifest


def problems(bundle: Path, manifest: dict) -> list[str]:
    """Every way the bundle differs from what its manifest promises (empty: intact)."""
    found = []
    if "digest" not in manifest:
        found.append(f"unsealed: {MANIFEST} (no digest: made by an older edgetl, or edited; rebuild the bundle)")
    else:
        try:
            ok = manifest["digest"] == digest(manifest)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            found.append(f"changed: {MANIFEST} (its digest does not match its content)")
    files, links = _walk(Path(bundle))
    have = {rel: file_sha256(Path(bundle, rel)) for rel in files}
    want = manifest["files"]
    found += [f"missing: {f}" for f in sorted(set(want) - set(have))]
    found += [f"added: {f}" + (_BYTECODE if "__pycache__" in f.split("/") else "")
              for f in sorted(set(have) - set(want))]
    found += [f"changed: {f}" for f in sorted(set(want) & set(have)) if want[f] != have[f]]
    found += [f"added: {f} (a symbolic link: a bundle holds regular files only)" for f in links]
    return [one_line(f) for f in found]


_BYTECODE = (" (Python's bytecode cache, written when the bundle's code was imported with bytecode writing "
             "on: delete the __pycache__ folder, and import bundles with PYTHONDONTWRITEBYTECODE=1)")


def one_line(text) -> str:
    """A file name or message with newlines and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def describe(bundle: Path, found: list[str]) -> str:
    """One line for a list of problems: the first file named, how many more."""
    kind, _, rest = found[0].partition(": ")
    name, _, why = rest.partition(" (")
    said = _SAID.get(kind, kind)
    more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
    return f"{Path(bundle) / name}: {said}" + (f" ({why}" if why else "") + more


_SAID = {"changed": "changed since the build", "missing": "missing (the build wrote it)",
         "added": "added after the build (the manifest does not list it)", "unsealed": "not sealed"}


def check(bundle: Path) -> dict:
    """The manifest of an intact bundle; IntegrityError naming the first bad file otherwise."""
    bundle = Path(bundle)
    manifest = load(bundle)
    try:
        found = problems(bundle, manifest)
    except OSError as e:
        raise IntegrityError(f"{bundle}: cannot read the bundle's files ({one_line(e)})",
                             [f"unreadable: {one_line(e)}"]) from None
    if found:
        raise IntegrityError(describe(bundle, found), found)
    return manifest
