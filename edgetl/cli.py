"""Command line. The only module that prints or exits.

Exit codes: 0 ok; 1 parity gate failed / bundle not intact; 2 usage or bad input; 3 the build could not
finish (internal error, full disk); 130 / 143 interrupted by SIGINT / SIGTERM (README "Failure modes").
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__, interrupt
from .errors import EdgetlError, Stopped, UsageError, VerifyError


class RichProgress:
    """Progress bars and stage lines on stderr (stdout stays clean for --json)."""

    def __init__(self, console=None):
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console

    def __reduce__(self):  # launched processes (--nproc) make their own console on their stderr
        return (RichProgress, ())

    def track(self, iterable, *, total=None, description=""):
        if not self.console.is_terminal:  # a log file or a CI console: stage lines only, no erased bars
            return iter(iterable)
        from rich.progress import track

        return iter(track(iterable, total=total, description=f"  {description}", console=self.console,
                          transient=True))

    def stage(self, name: str) -> None:
        self.console.print(f"[bold cyan]>[/] {name}")


def _fail(err: EdgetlError, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": str(err), "exit_code": err.exit_code,
                               "details": getattr(err, "misses", None) or getattr(err, "problems", None)}))
    else:
        click.echo(f"edgetl: error: {err}", err=True)
        for line in getattr(err, "misses", None) or getattr(err, "problems", None) or []:
            click.echo(f"  - {line}", err=True)
    sys.exit(err.exit_code)


def _run(fn, as_json: bool):
    """fn() with SIGINT/SIGTERM turned into a clean unwind; every error as one line and its exit code."""
    try:
        with interrupt.as_exceptions():
            return fn()
    except interrupt.Interrupted as e:
        _interrupted(e, as_json)
    except EdgetlError as e:
        _interrupted(interrupt.pending(), as_json)  # an error a signal caused (a killed worker) is the signal
        _fail(e, as_json)
    except Exception as e:  # a bug or an unsupported model: exit 3, never 1 (1 means "gate failed")
        _interrupted(interrupt.pending(), as_json)
        logging.getLogger("edgetl").debug("internal error", exc_info=True)
        _fail(EdgetlError(f"internal error: {type(e).__name__}: {e} (run with -vv for the traceback)"), as_json)


def _interrupted(e: interrupt.Interrupted | None, as_json: bool) -> None:
    if e is None:
        return
    published, pending = interrupt.unpublished()
    what = (f"nothing published for {', '.join(pending)}" if pending else
            "nothing published" if not published else "every target was published")
    done = f" (published: {', '.join(published)})" if published and pending else ""
    _fail(Stopped(f"interrupted by {e.signal_name}; {what}{done}; temporary and staging folders removed, "
                   "bundles already in OUT left as they were", e.exit_code), as_json)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetl")
@click.option("-v", "--verbose", count=True, help="log more (-vv for debug)")
def cli(verbose: int):
    """edgetl: labelled image folder -> fine-tuned, INT8, parity-gated edge bundles."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import warnings

    logging.captureWarnings(True)  # runtime warnings (e.g. a provider fallback) as one log line
    warnings.formatwarning = lambda message, category, *args, **kw: f"{category.__name__}: {message}"
    for noisy in ("nncf", "onnxruntime"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@cli.command()
@click.argument("recipe_file", required=False, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path),
              help="ImageFolder or pre-split folder (default: built-in shapes)")
@click.option("--backbone", help="registered backbone, e.g. mobilenet_v2, efficientnet_lite0 (`edgetl backbones`)")
@click.option("--weights", type=click.Path(path_type=Path), help="local ImageNet checkpoint (.pth)")
@click.option("--strategy", type=click.Choice(["feature-extract", "fine-tune"]))
@click.option("--target", multiple=True, help="built-in target name or profile .toml (repeatable)")
@click.option("--image-size", type=int, help="input size in pixels (default: the backbone's)")
@click.option("--epochs", type=int)
@click.option("--seed", type=int)
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default edgetl-out)")
@click.option("--device", help="training + float reference: auto (default), cpu, cuda, cuda:N")
@click.option("--workers", type=int, help="image decoding workers (default: cores - 1)")
@click.option("--nproc", type=int, help="training processes on this machine (torch elastic launch)")
@click.option("--jobs", type=int, help="targets built at once (the cores shared among them)")
@click.option("--effort", type=click.Choice(["low", "default", "max"]),
              help="INT8 search: low = first candidate only; default = cheap candidates until one is feasible, "
                   "QAT / mixed precision only where the best so far misses; max = every candidate")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="feature cache folder (default: ~/.cache/edgetl/features; $EDGETL_CACHE/features)")
@click.option("--cache/--no-cache", default=None, help="read and write the feature cache (default: on)")
@click.option("--require-certified/--no-require-certified", default=None,
              help="a model whose test split cannot certify the drop tolerance (NOT CERTIFIED) misses the "
                   "gate: exit 1, nothing published for its target (recipe gate.require_certified; "
                   "float models too)")
@click.option("--latency-ms", type=float,
              help="batch-1 latency budget: search [search] backbones x image_sizes, build the most accurate "
                   "that fits on every target (docs/budget.md)")
@click.option("--device-profile", type=click.Path(path_type=Path),
              help="with --latency-ms: latencies from this device profile (`edgetl bench --profile`)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON result object on stdout")
@click.option("-q", "--quiet", is_flag=True, help="no progress output")
def build(recipe_file, as_json, quiet, **flags):
    """Fine-tune, export, quantize, gate and bundle. RECIPE_FILE is optional (see `edgetl init`)."""

    def go():  # imports inside: an interrupt while torch loads is an interrupt too (exit 130, not 1)
        from rich.console import Console

        from .pipeline import build as run_build
        from .progress import NullProgress
        from .recipe import CLI_KEYS, load_recipe

        overrides = {CLI_KEYS[k]: v for k, v in flags.items() if v is not None and v != ()}
        recipe = load_recipe(recipe_file, overrides)
        console = Console(stderr=True)
        progress = NullProgress() if (quiet or as_json) else RichProgress(console)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
            return run_build(recipe, progress)

    result = _run(go, as_json)
    if result is None:  # a rank other than 0 of a torchrun build: rank 0 reports
        sys.exit(0)
    if as_json:
        click.echo(json.dumps(result.to_dict(), default=str))
    else:
        _print_summary(result)
    sys.exit(result.exit_code)


def _print_summary(result) -> None:
    from .report import margin_line

    click.echo(f"data: {sum(sum(c.values()) for c in result.data['counts'].values())} images, "
               f"{len(result.data['classes'])} classes, {len(result.data['skipped'])} skipped")
    for s in result.data["skipped"][:20]:
        click.echo(f"  skipped {s['file']}: {s['reason']}")
    for w in result.data.get("warnings", []):
        click.echo(f"  warning: {w}")
    ref = result.reference
    if ref:
        click.echo(f"float reference: accuracy {ref['accuracy']:.4f}, n_test {ref['n_test']}, "
                   f"FP32 ONNX {ref['fp32_onnx_bytes'] / 1e6:.2f} MB, {ref['latency_ms']:.2f} ms "
                   "(batch 1, float input, rough: timed during gating; each model's speed vs FP32 is the measure)")
    for t in result.targets:
        click.echo(f"{t.target}: {t.status}" + (f" ({t.bundle})" if t.published else ""))
        for m in t.models:
            met, q = m.metrics, m.quantization
            pace = ", ".join(f"{v['ratio']:.2f}x at batch {k.removeprefix('batch_')}"
                             for k, v in m.speed.items() if k.startswith("batch_"))
            click.echo(
                f"  {m.summary()}, drop 95 % upper bound {met.drop_upper95_pp:+.2f} pp, "
                f"{len(met.changed)} predictions changed, "
                f"{m.sizes['ratio']:.2f}x fp32 size, {m.latency_ms:.2f} ms"
                + (f", {q.chosen} ({len(q.float_nodes)} float layers)" if q else "")
                + f"; speed vs FP32 {pace or '-'}; validated with {m.validated_with}"
                + ("; input uint8 NHWC pixels" if m.takes_pixels else ""))
            margin, rule = margin_line(met.agreement_by_margin), met.gate_rule
            if margin or rule:
                click.echo(f"    {margin}{'; ' if margin and rule else ''}"
                           + (f"gate rule {rule['applied']}" + ("" if m.certified is not False
                                                                else ": NOT CERTIFIED (see the warning)")
                              if rule else ""))
        for w in t.warnings:
            click.echo(f"  warning: {w}")
        for miss in t.misses:
            click.echo(f"  - {miss}")
    click.echo(f"total {result.timings['total']:.1f} s; report {Path(result.out) / 'report.html'}")


@cli.command()
@click.argument("path", required=False, default="edgetl.toml", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="overwrite an existing file")
def init(path: Path, force: bool):
    """Write a commented default recipe (default: edgetl.toml)."""
    from .recipe import template

    if path.exists() and not force:
        _fail(UsageError(f"{path}: already exists; fix: pass --force or another path"), False)
    try:
        path.write_text(template(), encoding="utf-8")
    except OSError as e:
        _fail(UsageError(f"{path}: cannot write ({e.strerror}); fix: choose a writable path"), False)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--selftest", is_flag=True, help="also run the golden inputs through the bundle's runtime")
@click.option("--public-key", type=click.Path(path_type=Path),
              help="also check bundle.sig (`edgetl sign`) against this PEM public key")
@click.option("--json", "as_json", is_flag=True)
def verify(bundle_dir: Path, selftest: bool, public_key: Path | None, as_json: bool):
    """Exit 0 if every file and the manifest itself match what the build wrote (and, with
    --public-key, the signature is valid); 1 if anything is missing, added or changed."""
    from . import bundle

    def go():
        out = bundle.verify(bundle_dir, public_key=public_key)
        if selftest:
            out["selftest"] = bundle.selftest(bundle_dir)
        return out

    out = _run(go, as_json)
    signature = {"verified": ", signature verified", "present, not checked":
                 ", signed (signature not checked: pass --public-key)", "none": ""}[out["signature"]]
    click.echo(json.dumps(out) if as_json else f"{bundle_dir}: intact ({out['files']} files{signature})"
               + (f", self-test passed ({out['selftest']['n']} golden inputs)" if selftest else ""))


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path),
              help="PEM elliptic-curve private key (P-256/P-384/P-521)")
@click.option("--password-env", metavar="NAME", help="environment variable holding the key's password")
@click.option("--json", "as_json", is_flag=True)
def sign(bundle_dir: Path, key: Path, password_env: str | None, as_json: bool):
    """Sign an intact bundle (sigstore model-signing, offline key pair): writes BUNDLE/bundle.sig,
    checked by `edgetl verify BUNDLE --public-key PUBLIC.pem`."""
    import os

    from . import bundle

    def go():
        password = None
        if password_env:
            if password_env not in os.environ:
                raise UsageError(f"--password-env {password_env}: not set; fix: export {password_env}=...")
            password = os.environ[password_env]
        return bundle.sign(bundle_dir, key, password)

    out = _run(go, as_json)
    click.echo(json.dumps(out) if as_json else f"signed {bundle_dir}: {out['signature']}")


@cli.command()
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="batch size for the throughput figure")
@click.option("--runs", default=100, show_default=True, type=click.IntRange(min=1),
              help="timed batch-1 runs (after warm-up)")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="bundles are measured in turn, this many rounds, so drift hits all alike")
@click.option("--model", help="which model of each bundle (default: its default model)")
@click.option("--no-verify", is_flag=True, help="measure bundles whose files differ from their manifest")
@click.option("--profile", "profile_out", type=click.Path(path_type=Path),
              help="instead: write a device profile of this machine (docs/budget.md) for --target over "
                   "--backbones x --image-sizes, for `edgetl build --device-profile`")
@click.option("--target", default="cpu", show_default=True, help="--profile: the target whose runtime is timed")
@click.option("--backbones", default="mobilenet_v2,efficientnet_lite0", show_default=True,
              help="--profile: comma-separated backbones")
@click.option("--image-sizes", default="96,128,160,224", show_default=True,
              help="--profile: comma-separated input sizes (each backbone up to its native size)")
@click.option("--graphs", type=click.Path(path_type=Path),
              help="--profile: also write the graphs here, for a device without torch (predict.py --profile)")
@click.option("--json", "as_json", is_flag=True)
def bench(bundles, batch: int, runs: int, warmup: int, rounds: int, model: str | None, no_verify: bool,
          profile_out: Path | None, target: str, backbones: str, image_sizes: str, graphs: Path | None,
          as_json: bool):
    """Latency (p50/p90, batch 1), throughput at --batch, peak memory and cold-load time of BUNDLES,
    each through its own runtime (predict.py + engine), interleaved in one process. With --profile:
    a device profile instead."""
    from . import bundle
    from .bench import bench_bundles

    if profile_out is not None:
        _profile(profile_out, target, backbones, image_sizes, graphs, runs, as_json)
        return
    if not bundles:
        _fail(UsageError("give BUNDLES to measure, or --profile OUT.json"), as_json)

    def go():
        for b in bundles:  # fail fast: tampered, missing runtime, damaged bundle
            bundle.load_predictor(b, model, verify=not no_verify)
        return bench_bundles({str(b): (lambda b=b: bundle.load_predictor(b, model, verify=False)) for b in bundles},
                             batch=batch, runs=runs, warmup=warmup, rounds=rounds, model=model)

    res = _run(go, as_json)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"{'bundle':32s} {'runs on':26s} {'p50 ms':>8s} {'p90 ms':>8s} {'img/s@' + str(batch):>10s} "
               f"{'cold ms':>8s} {'peak MB':>7s}")
    for name, r in res["bundles"].items():
        rss = r.get("standalone_peak_rss_mb") or r["rss_delta_mb"]
        click.echo(f"{name[-32:]:32s} {r['executed_by'][:26]:26s} {r['batch1_p50_ms']:8.2f} "
                   f"{r['batch1_p90_ms']:8.2f} {r['throughput_ips']:10.1f} {r['cold_load_ms']:8.0f} {rss:7.0f}")
    click.echo(f"machine: {res['machine']['cpu']} ({res['machine']['cores']} cores); peak MB: the bundle's own "
               "predict.py --bench in a fresh process")


def _profile(out: Path, target: str, backbones: str, image_sizes: str, graphs: Path | None, runs: int,
             as_json: bool) -> None:
    def go():
        from .bench import parse_space, take_profile
        from .features import default_dir

        prof = take_profile(target, *parse_space(backbones, image_sizes), runs=runs, graphs_dir=graphs,
                            cache_dir=default_dir(), progress=None if as_json else RichProgress())
        out.write_text(json.dumps(prof, indent=1) + "\n", encoding="utf-8")
        return prof

    prof = _run(go, as_json)
    if as_json:
        click.echo(json.dumps(prof))
        return
    for r in prof["latencies"]:
        click.echo(f"{r['backbone']:20s} {r['image_size']:4d} px {r['precision']:5s} {r['latency_ms']:8.3f} ms "
                   f"(p90 {r['p90_ms']:.3f}, {r['runs']} runs)")
    click.echo(f"wrote {out} ({prof['cpu']}, {prof['threads']} threads)" + (f"; graphs in {graphs}" if graphs else ""))


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="run even if the bundle's files differ from its manifest")
@click.option("--public-key", type=click.Path(path_type=Path),
              help="also require a valid bundle.sig made with this key's private half")
@click.option("--json", "as_json", is_flag=True)
def predict(bundle_dir: Path, images, no_verify: bool, public_key: Path | None, as_json: bool):
    """Classify IMAGES with a bundle (same code path as the bundle's predict.py). The bundle is
    checked against its manifest first: a tampered one is refused (exit 1) unless --no-verify."""
    from . import bundle

    if no_verify and public_key:
        _fail(UsageError("--no-verify and --public-key: pick one"), as_json)
    results = _run(lambda: bundle.load_predictor(bundle_dir, verify=not no_verify, public_key=public_key)
                   .predict_files(images), as_json)
    if as_json:
        click.echo(json.dumps({"predictions": results}))
    else:
        for r in results:
            click.echo(f"{r['file']}\terror: {r['error']}" if "error" in r else
                       f"{r['file']}\t{r['label']}\t{r['probability']:.4f}")
    sys.exit(2 if any("error" in r for r in results) else 0)


@cli.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def info(bundle_dir: Path, as_json: bool):
    """Show what a bundle promises: target, classes, metrics, versions."""
    from .bundle import read_manifest

    m = _run(lambda: read_manifest(bundle_dir), as_json)
    from .runtime.integrity import digest

    if "digest" in m and m["digest"] != digest(m):  # an edited manifest: say so rather than read its shape
        _fail(VerifyError(f"{bundle_dir}: manifest.json does not match its digest (edited since the build): the "
                          "bundle is not intact; fix: rebuild it, and see `edgetl verify`"), as_json)
    if as_json:
        click.echo(json.dumps({k: v for k, v in m.items() if k != "files"}))
        return
    try:
        _print_info(m)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        _fail(VerifyError(f"{bundle_dir}: manifest.json is not shaped as edgetl writes it ({type(e).__name__}: {e}); "
                          "fix: rebuild the bundle"), False)


def _print_info(m: dict) -> None:
    met = m["metrics"]
    click.echo(f"target      {m['target']} ({m['backend']})")
    click.echo(f"backbone    {m['backbone']['name']} ({m['backbone']['weights_origin']})")
    click.echo(f"classes     {', '.join(m['classes'])}")
    click.echo(f"input       {m['preprocess']['input_size']} {m['preprocess']['channel_order']} "
               f"{m['preprocess']['layout']} {m['preprocess'].get('dtype', 'float32')}")
    from .results import ModelResult, published_status

    default = ModelResult.from_dict(next(iter(m["models"].values())))
    click.echo(f"accuracy    float {met['reference_accuracy']:.4f}, default model {default.summary()}, "
               f"n_test {met['n_test']}")
    certified = m.get("certified", default.certified)
    models = [ModelResult.from_dict(d) for d in m["models"].values()]
    shy = next((x for x in models if x.certified is False), default)  # the model the status is about
    tol = shy.metrics.gate_rule.get("tolerance_pp", "?")
    bound = (f" ({shy.precision}: drop 95 % upper bound {shy.metrics.drop_upper95_pp:.2f} pp > tolerance {tol} pp)"
             if certified is False else "")
    click.echo(f"status      {m.get('status', published_status(True, certified))}{bound}")
    q = m["quantization"]
    click.echo(f"quantizer   {q['chosen']} ({len(q['float_nodes'])} float layers)" if q.get("chosen")
               else "quantizer   none (float model)")
    size = m["sizes"].get("model_bytes", m["sizes"].get("int8_bytes"))
    click.echo(f"size        {size} bytes ({m['sizes']['ratio']:.2f}x fp32)")
    models = ", ".join(f"{k} (validated with {v['validated_with']})" for k, v in m.get("models", {}).items())
    click.echo(f"models      {models}")
    when = m.get("created") or "time not recorded (SOURCE_DATE_EPOCH was not set)"
    click.echo(f"built       {when} with edgetl {m['edgetl_version']}, seed {m['seed']}")
    click.echo(f"digest      {m.get('digest', 'none (older bundle)')}")
    click.echo(f"files       {len(m['files'])}")


@cli.command("backbones")
def list_backbones():
    """List the registered backbones and their native input size."""
    from . import backbones

    for name in backbones.names():
        spec = backbones.get(name)
        click.echo(f"{name:20s} {spec.native_size}px  {spec.weights_file}")


@cli.command("targets")
def list_targets():
    """List the built-in target profiles (pass a name or your own profile .toml to --target)."""
    from .profiles import builtin_names, load_profile

    for name in builtin_names():
        p = load_profile(name)
        click.echo(f"{name:10s} {p.backend:12s} {'+'.join(p.precisions):10s} {p.description}")


def main() -> None:
    """The `edgetl` console script."""
    cli(prog_name="edgetl")


if __name__ == "__main__":
    main()
