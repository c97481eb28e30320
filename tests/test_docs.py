"""The docs and the repository as a newcomer meets them: the strict docs build, the generated reference,
the changelog, and no large files tracked."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetl import reference_doc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000


def _mkdocs(root: Path, site: Path) -> subprocess.CompletedProcess:
    # never -q: mkdocs 1.6 counts the warnings that fail a strict build only when it logs them
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=300)


def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: every page in the nav exists, every page is in the nav, every link and
    anchor resolves (what CI checks through `make test`)."""
    res = _mkdocs(ROOT, tmp_path / "site")
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}{res.stderr}"
    pages = {p.name for p in (tmp_path / "site").glob("*.html")}
    assert {"index.html", "guide.html", "reference.html", "bundle.html", "changelog.html"} <= pages


def test_strict_build_fails_on_a_broken_link_and_an_unlisted_page(tmp_path):
    """The strict build is a real check: a link to a missing page, or a page outside the nav, fails it."""
    for name, text in (("guide.md", "\nSee [the missing page](no-such-page.md).\n"), ("orphan.md", "# Orphan\n")):
        copy = tmp_path / name
        shutil.copytree(ROOT / "docs", copy / "docs")  # changelog.md (a link to CHANGELOG.md) copied as a file
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        with open(copy / "docs" / name, "a", encoding="utf-8") as f:
            f.write(text)
        res = _mkdocs(copy, copy / "site")
        assert res.returncode != 0, f"a strict build passed with {name} changed"
        assert ("no-such-page.md" if name == "guide.md" else "orphan.md") in res.stdout + res.stderr


def test_reference_is_generated_from_the_models():
    committed = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert committed == reference_doc.reference_markdown(), (
        f"docs/reference.md is not what the recipe and profile models say; regenerate it: {reference_doc.COMMAND}")


def test_every_recipe_and_profile_key_is_described():
    assert reference_doc.undocumented() == [], "give these fields a Field(description=...)"


def test_reference_lists_every_key_with_its_default_and_flag():
    from pydantic import BaseModel

    from edgetl.profiles import TargetProfile
    from edgetl.recipe import BuildRecipe

    text = reference_doc.reference_markdown()
    rows = {m.group(1): line for line in text.splitlines() if (m := re.match(r"\| `([\w.]+)` \|", line))}
    for model in (BuildRecipe, TargetProfile):
        for name, info in model.model_fields.items():
            inner, _ = reference_doc._strip(info.annotation)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys = [f"{name}.{k}" for k in inner.model_fields]
            else:
                keys = [] if info.exclude else [name]
            assert all(k in rows for k in keys), f"{keys} missing from the reference"
    assert "| `40` | `--epochs` |" in rows["train.epochs"]  # the default and the flag, read from the code
    assert "| required |" in rows["quantization.quantizers"] and "unset" in rows["quantize.effort"]
    assert "source" not in rows  # excluded fields are not keys a user writes


def test_changelog_has_the_package_version():
    """CHANGELOG.md (Keep a Changelog) has a section for the version pyproject.toml says, or an
    [Unreleased] one while it is a development version."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    log = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    heads = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", log, flags=re.M)
    assert heads and heads[0][0] == "Unreleased"
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) and date for v, date in heads[1:]), heads
    if ".dev" in version:
        assert f"the package says `{version}`" in log, "say the development version under [Unreleased]"
    else:
        assert version in [v for v, _ in heads], f"CHANGELOG.md has no section for {version}"


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an unpacked sdist)")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_large_file_is_tracked_outside_third_party():
    big = [(p, (ROOT / p).stat().st_size) for p in _tracked()
           if not p.startswith("third_party/") and (ROOT / p).is_file() and (ROOT / p).stat().st_size > MB]
    assert not big, f"files over 1 MB tracked outside third_party/: {big}; remove them (git rm) or move them"


def test_the_readme_is_short_starts_with_the_two_commands_and_has_no_placeholder():
    """README <= 250 lines; `make demo` and `make test` within its first 20 lines (the CI entry point
    calls the second); no placeholder left where measured output belongs."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:20])
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert not re.search(r"SAMPLE_OUTPUT|TODO|TBD|XXX", "\n".join(lines))
