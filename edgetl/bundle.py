"""Stage 7: write a bundle into a staging folder, hash it, and publish it atomically; verify it later."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .artifact import file_sha256
from .errors import UsageError, VerifyError

MANIFEST = "manifest.json"
REQUIRED_KEYS = ("target", "backend", "files", "versions", "seed", "data_sha256", "calibration_sha256", "metrics")


def staging_dir(out: Path, target: str) -> Path:
    """A fresh folder beside the final one (same file system, so publishing is one rename)."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{target}-", dir=out))
    stage.chmod(0o755)  # mkdtemp makes it private; a published bundle is meant to be shared
    return stage


def write_files(stage: Path, files: dict[str, Path | str | bytes]) -> None:
    """Bundle-relative name -> source path (copied), text or bytes."""
    for rel, src in files.items():
        dest = stage / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copyfile(src, dest)
        elif isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            dest.write_text(src, encoding="utf-8")


def hash_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() != MANIFEST}


def write_manifest(stage: Path, manifest: dict) -> dict:
    manifest = dict(manifest, files=hash_tree(stage))
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def publish(stage: Path, final: Path) -> None:
    """Swap the staged bundle into place; an older bundle is removed only after the swap."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(stage, final)
    except OSError:
        if old is not None:
            os.replace(old, final)  # put the previous bundle back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(stage: Path | None) -> None:
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{bundle}: no {MANIFEST}; fix: pass a bundle folder written by `edgetl build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise VerifyError(f"{path}: not a readable JSON manifest ({e})", [f"{MANIFEST}: unreadable"]) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing or not isinstance(manifest.get("files"), dict):
        raise VerifyError(f"{path}: manifest lacks {missing or ['files']}", [f"{MANIFEST}: incomplete"])
    return manifest


def verify(bundle: Path) -> dict:
    """Compare every file with the manifest; raise VerifyError listing missing/added/changed files."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    want = manifest.get("files", {})
    have = hash_tree(bundle)
    problems = [f"missing: {f}" for f in sorted(set(want) - set(have))]
    problems += [f"added: {f}" for f in sorted(set(have) - set(want))]
    problems += [f"changed: {f}" for f in sorted(set(want) & set(have)) if want[f] != have[f]]
    if problems:
        raise VerifyError(f"{bundle}: {len(problems)} file(s) do not match the manifest", problems)
    return {"bundle": str(bundle), "files": len(want), "ok": True}
