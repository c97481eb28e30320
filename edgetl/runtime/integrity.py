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


def hash_tree(root: Path) -> dict[str, str]:
    """Bundle-relative posix name -> sha256 of every file but the unlisted ones."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in UNLISTED}


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
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: not a readable JSON manifest ({e})", [f"{MANIFEST}: unreadable"]) from None
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
    want, have = manifest["files"], hash_tree(bundle)
    found += [f"missing: {f}" for f in sorted(set(want) - set(have))]
    found += [f"added: {f}" for f in sorted(set(have) - set(want))]
    found += [f"changed: {f}" for f in sorted(set(want) & set(have)) if want[f] != have[f]]
    return found


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
    found = problems(bundle, manifest)
    if found:
        raise IntegrityError(describe(bundle, found), found)
    return manifest
