"""Stage 7: write a bundle into a staging folder, hash it, and publish it atomically; verify and sign it later.

A bundle is a function of its inputs (data, recipe, seed, versions): two builds of the same inputs
write the same bytes. Measurements of the build machine (seconds, latency, speed) go to
OUT/report.json, never into the bundle; `created` is written only from SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import interrupt
from .errors import UsageError, VerifyError, require
from .runtime.integrity import MANIFEST, SIGNATURE, IntegrityError, canonical, describe, load, problems, seal

REQUIRED_KEYS = ("target", "backend", "files", "versions", "seed", "data_sha256", "calibration_sha256", "metrics")
# Evidence of the build machine: report.json keeps them; a bundle's manifest never does.
MEASUREMENTS = frozenset({"seconds", "speed", "latency_ms", "latency_measured_with"})


def staging_dir(out: Path, target: str) -> Path:
    """A fresh folder beside the final one (same file system, so publishing is one rename)."""
    out.mkdir(parents=True, exist_ok=True)
    with interrupt.deferred():  # made and handed back as one step: a signal cannot orphan it
        stage = Path(tempfile.mkdtemp(prefix=f".staging-{target}-", dir=out))
    try:
        stage.chmod(0o755)  # mkdtemp makes it private; a published bundle is meant to be shared
    except BaseException:
        discard(stage)
        raise
    return stage


def write_files(stage: Path, files: dict[str, Path | str | bytes]) -> None:
    """Bundle-relative name -> source path (copied), text or bytes."""
    for rel, src in files.items():
        dest = stage / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path):
                shutil.copyfile(src, dest)
            elif isinstance(src, bytes):
                dest.write_bytes(src)
            else:
                dest.write_text(src, encoding="utf-8")
        except OSError as e:
            if not e.filename:  # a write's error names no file: name the one it was writing
                e.filename = str(dest)
            raise


def without_measurements(obj):
    """`obj` with every build-machine measurement (MEASUREMENTS keys, at any depth) left out."""
    if isinstance(obj, dict):
        return {k: without_measurements(v) for k, v in obj.items() if k not in MEASUREMENTS}
    if isinstance(obj, list):
        return [without_measurements(v) for v in obj]
    return obj


def created() -> str | None:
    """The build time a bundle may carry: SOURCE_DATE_EPOCH's, or none (a wall clock is no input)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return None
    try:
        if not epoch.isdigit():
            raise ValueError(epoch)
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"SOURCE_DATE_EPOCH={epoch[:40]!r}: not a time in whole seconds since 1970; fix: e.g. "
                         "SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)") from None


def write_manifest(stage: Path, manifest: dict) -> dict:
    """Seal the manifest (every file's sha256 and its own digest) and write it, canonical and stable."""
    manifest = seal(without_measurements(manifest), stage)
    canonical(manifest)  # refuses NaN / non-JSON values before anything is written
    write_files(stage, {MANIFEST: json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"})
    return manifest


def publish(stage: Path, final: Path) -> None:
    """Swap the staged bundle into place; an older bundle is removed only after the swap. Signals
    wait until it is all done, so an interrupt never leaves OUT/<target> missing or an old copy behind."""
    old = None
    with interrupt.deferred():
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
        try:
            os.replace(stage, final)
        except OSError:
            if old is not None:
                os.replace(old, final)  # put the previous bundle back
            raise
        interrupt.record_published(final.name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def discard(stage: Path | None) -> None:
    if stage is not None:
        with interrupt.deferred():
            shutil.rmtree(stage, ignore_errors=True)


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{bundle}: no {MANIFEST}; fix: pass a bundle folder written by `edgetl build`")
    try:
        manifest = load(bundle)
    except IntegrityError as e:
        raise VerifyError(str(e), e.problems) from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise VerifyError(f"{path}: manifest lacks {missing}", [f"{MANIFEST}: incomplete"])
    return manifest


def verify(bundle: Path, public_key: Path | None = None) -> dict:
    """Every file and the manifest itself against the manifest's hashes and digest; with
    `public_key`, the signature too. VerifyError lists every problem."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    found = problems(bundle, manifest)
    if found:
        raise VerifyError(describe(bundle, found), found)
    signed = (bundle / SIGNATURE).is_file()
    if public_key is not None:
        if not signed:
            raise VerifyError(f"{bundle / SIGNATURE}: missing; fix: sign the bundle (`edgetl sign {bundle} --key KEY`)",
                              [f"missing: {SIGNATURE}"])
        _check_signature(bundle, Path(public_key))
    return {"bundle": str(bundle), "files": len(manifest["files"]), "ok": True, "digest": manifest["digest"],
            "signature": "verified" if public_key is not None else ("present, not checked" if signed else "none")}


def _hashing(model_signing, *also: str):
    """The signature covers every file of the bundle but the signature itself (git paths included)."""
    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE, *also], ignore_git_paths=False)


def _signing_lib():
    return require("model_signing", "sign")


def _ec_key_problem(path: Path, private: bool) -> str | None:
    """model-signing takes EC keys (P-256/384/521) only; other keys crash inside it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError:  # encrypted: model-signing asks for the password
        return None
    except ValueError:
        return f"not a PEM {'private' if private else 'public'} key"
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or \
            key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        return "not an elliptic-curve P-256/P-384/P-521 key"
    return None


def sign(bundle: Path, key: Path, password: str | None = None) -> dict:
    """Sign an intact bundle with an EC private key (sigstore model-signing, offline): BUNDLE/bundle.sig."""
    bundle = Path(bundle)
    ms = _signing_lib()
    verify(bundle)  # never sign a bundle that is not what the build wrote
    bad = _ec_key_problem(Path(key), private=True)
    if bad:
        raise UsageError(f"--key {key}: {bad}; fix: openssl genpkey -algorithm EC -pkeyopt "
                         "ec_paramgen_curve:P-256 -out private.pem")
    target = bundle / SIGNATURE
    tmp = bundle / f".{SIGNATURE}.tmp"
    try:
        (ms.signing.Config().use_elliptic_key_signer(private_key=Path(key),
                                                     password=password.encode() if password else None)
         .set_hashing_config(_hashing(ms, tmp.name))
         .sign(bundle, tmp))
        os.replace(tmp, target)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--key {key}: {e}; fix: pass the right key / --password") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"bundle": str(bundle), "signature": str(target)}


def _check_signature(bundle: Path, public_key: Path) -> None:
    ms = _signing_lib()
    bad = _ec_key_problem(public_key, private=False)
    if bad:
        raise UsageError(f"--public-key {public_key}: {bad}; fix: pass the PEM public key of the signing key "
                         "(openssl pkey -in private.pem -pubout -out public.pem)")
    from cryptography.exceptions import InvalidSignature

    sig = bundle / SIGNATURE
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            _hashing(ms)).verify(bundle, sig)
    except InvalidSignature:
        raise VerifyError(f"{sig}: the signature is not valid (damaged, or made for other content)",
                          [f"invalid: {SIGNATURE}"]) from None
    except ValueError as e:
        text = str(e)
        if text.startswith("Key mismatch"):
            raise VerifyError(f"{sig}: made with another key than {public_key}", [f"wrong key: {SIGNATURE}"]) from None
        if text.startswith("Signature mismatch"):
            # The library's message is a list's repr: quotes inside it may come escaped.
            names = re.findall(r"(?:Extra files found|Missing files) in model [^:]*: ([^\"'\]\\]+)"
                               r"|Hash mismatch for \\*'([^'\\]+)", text)
            files = sorted({f.strip() for a, b in names for f in (a or b).split(", ")}) or ["?"]
            raise VerifyError(f"{bundle}: files differ from what was signed: {', '.join(files)}",
                              [f"not signed: {f}" for f in files]) from None
        raise VerifyError(f"{sig}: unreadable signature ({text[:200]})", [f"unreadable: {SIGNATURE}"]) from None
    except (KeyError, TypeError) as e:
        raise VerifyError(f"{sig}: unreadable signature ({type(e).__name__}: {e})",
                          [f"unreadable: {SIGNATURE}"]) from None

