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
import sys
import tempfile
import time
from pathlib import Path

from . import interrupt
from .errors import MissingDependencyError, UsageError, VerifyError, require
from .runtime.integrity import MANIFEST, SIGNATURE, IntegrityError, canonical, describe, load, problems, seal

REQUIRED_KEYS = ("target", "backend", "files", "versions", "seed", "data_sha256", "calibration_sha256", "metrics")
# Evidence of the build machine: report.json keeps them; a bundle's manifest never does.
MEASUREMENTS = frozenset({"seconds", "speed", "latency_ms", "latency_measured_with"})
# ... except the budget search's latencies: they chose what ships, so they are an input of the build,
# recorded (read from a device profile, or this machine's cached first measurement: docs/budget.md).
INPUTS = frozenset({"search"})


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
        return {k: v if k in INPUTS else without_measurements(v) for k, v in obj.items() if k not in MEASUREMENTS}
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
    """Remove a staging folder (signals held back until it is gone)."""
    if stage is not None:
        with interrupt.deferred():
            shutil.rmtree(stage, ignore_errors=True)


def read_manifest(bundle: Path) -> dict:
    """The bundle's manifest; UsageError without one, VerifyError when unreadable or incomplete."""
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


# Loading a bundle as a device would: its own predict.py and engine (for predict, bench, verify --selftest).

_verify = verify  # load_predictor's `verify` flag shadows the function


def load_predictor(bundle_dir: Path, model: str | None = None, *, verify: bool = True, public_key: Path | None = None):
    """The bundle's own predict.py, imported from the bundle (so its own engine file runs); with
    `verify`, only once every file matches its manifest (exit 1 naming the first that does not) and,
    with `public_key`, its signature holds."""
    if verify:
        _verify(bundle_dir, public_key=public_key)
    manifest = read_manifest(bundle_dir)
    try:
        runtime = json.loads((bundle_dir / "runtime.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VerifyError(f"{bundle_dir}: runtime.json unreadable ({e}); fix: run `edgetl verify` or rebuild",
                          [str(e)]) from None
    from .runtime.predict import BundleError, model_name

    try:
        model_name(bundle_dir, runtime, model)  # checked before the bundle's own (perhaps older) code runs
    except BundleError as e:
        raise UsageError(str(e)) from None
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # leave no __pycache__ in the bundle
    try:
        return _load_predictor(bundle_dir, model, manifest, runtime)
    finally:
        sys.dont_write_bytecode = bytecode


def _load_predictor(bundle_dir: Path, model: str | None, manifest: dict, runtime: dict):
    import inspect

    module = _bundle_module(bundle_dir)
    checked = {"verify": False} if "verify" in inspect.signature(module.Predictor.from_bundle).parameters else {}
    try:
        return module.Predictor.from_bundle(bundle_dir, model=model, **checked)  # checked above, by edgetl
    except ImportError as e:
        raise MissingDependencyError(f"{bundle_dir}: its runtime needs {e.name} (target {manifest.get('target')}); "
                                     f"fix: pip install {' '.join(runtime.get('requires', []))}") from None
    except Exception as e:  # the runtime could not load the bundle's files: damaged, truncated, missing
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
        raise VerifyError(f"{bundle_dir}: bundle is incomplete or damaged ({type(e).__name__}: "
                          f"{(lines or [''])[0][:200]}); fix: run `edgetl verify {bundle_dir}`", [str(e)]) from None


def _bundle_module(bundle_dir: Path):
    """Import BUNDLE/predict.py under a private name (its engine_*.py and preprocess.py beside it)."""
    import importlib.util

    path = Path(bundle_dir) / "predict.py"
    if not path.is_file():
        raise VerifyError(f"{bundle_dir}: no predict.py; fix: rebuild the bundle or run `edgetl verify`",
                          [f"missing {path}"])
    name = f"_edgetl_bundle_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.path.insert(0, str(path.parent))
    try:
        sys.modules.pop("preprocess", None)  # another bundle's copy
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def selftest(bundle_dir: Path) -> dict:
    """Every model of the bundle on its golden inputs, through the bundle's own runtime; VerifyError
    listing every failure."""
    runtime = json.loads((Path(bundle_dir) / "runtime.json").read_text(encoding="utf-8"))
    results = [load_predictor(bundle_dir, m, verify=False).selftest(bundle_dir, m) for m in runtime["models"]]
    failures = [f"{r['model']}: {f}" for r in results for f in r["failures"]]
    if failures:
        raise VerifyError(f"{bundle_dir}: golden self-test failed", failures)
    return {"ok": True, "n": sum(r["n"] for r in results), "models": results}
