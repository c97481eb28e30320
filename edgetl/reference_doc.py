"""docs/reference.md, generated from the validated models (recipe.py, profiles.py) so that it cannot drift:
every key, its type and range, its default, its flag and its description come from the models.

Regenerate: `python -m edgetl.reference_doc docs/reference.md` (tests/test_docs.py compares).
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .profiles import TargetProfile
from .recipe import CLI_KEYS, BuildRecipe

COMMAND = "python -m edgetl.reference_doc docs/reference.md"

RECIPE_INTRO = """\
A recipe is a TOML file; `edgetl init edgetl.toml` writes one with comments and every default, and
`edgetl build edgetl.toml` reads it. Every key is optional and a flag overrides the key it names.
Unknown keys, values of the wrong type or range, a section written as something other than one table
(`[[data]]`), NaN/infinity and TOML the parser cannot hold are all rejected with exit 2 and one line
naming the file and the key (the recipe and profile loaders are fuzzed with hypothesis in the tests).
Paths written in a recipe file are relative to that file; paths given as flags are relative to the
working directory. "unset" means the key has no value of its own: its description says what is used."""

PROFILE_INTRO = """\
A **target profile** is data: the built-in ones are `edgetl/targets/{cpu,cpu-arm64,openvino,gpu,gpu-int8}.toml`
(`edgetl targets` lists them). To make your own, copy one, edit it and pass its path to `--target` (or list
it in the recipe's `targets`). The same validation as the recipe's applies: exit 2 and one line naming the
file and the key. The recipe's `[gate]` keys, when set, override the profile's `[tolerances]` of the same name."""


def _strip(annotation):
    """The annotation without Annotated[...] and without None; and whether None was allowed."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])[0], True
    return annotation, False


def _type(annotation) -> str:
    """A key's type in the words of TOML."""
    annotation, _ = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in typing.get_args(annotation))
    if origin is list:
        inner = _type(typing.get_args(annotation)[0])
        return f"array ({inner})" if inner.startswith("one of") else f"array of {inner}s"
    if origin is dict:
        return "table"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _limits(info: FieldInfo) -> list[str]:
    """Ranges, lengths and patterns of a key, from its validation metadata."""
    out = []
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}  # pydantic's metadata: annotated_types.Gt(gt=0), ...
    for m in info.metadata:
        for attr, sign in signs.items():
            value = getattr(m, attr, None)
            if isinstance(value, (int, float)):
                out.append(f"{sign} {value if isinstance(value, int) else format(value, 'g')}")
        if getattr(m, "min_length", None):
            out.append(f"at least {m.min_length}")
        pattern = getattr(m, "pattern", None)
        if isinstance(pattern, str) and "|" not in pattern:  # alternatives: the description lists them
            out.append(f"matches `{pattern}`")
    return out


def _toml(value) -> str:
    """A default as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict, str)):
        return json.dumps(value)
    return str(value)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return f"`{_toml(info.default_factory())}`"
    if info.default is PydanticUndefined:
        return "required"
    return "unset" if info.default is None else f"`{_toml(info.default)}`"


def _text(text: str) -> str:
    """A description as a table cell: pipes escaped; outside code spans `<` escaped, None said as TOML
    says it (unset) and names of docs pages as links."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        part = parts[i].replace("<", "&lt;")
        part = re.sub(r"\bNone(?= ?[=:])", "unset", part)  # "None = ...": Python's word for TOML's unset
        parts[i] = re.sub(r"(?:docs/)?\b([a-z][a-z-]*\.md)\b", r"[\1](\1)", part)
    return "`".join(parts).replace("|", "\\|")  # (code spans hold no pipe: see _limits)


def _flags() -> dict[str, str]:
    """Dotted recipe key -> its `edgetl build` flags, read from the command itself."""
    from .cli import build

    params = {p.name: p for p in build.params}
    return {key: " / ".join(f"`{o}`" for o in (*params[name].opts, *params[name].secondary_opts))
            for name, key in CLI_KEYS.items() if name in params}


def _section_doc(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    return "" if doc.startswith(f"{model.__name__}(") else " ".join(doc.split())  # pydantic's own doc: skip


def _tables(model: type[BaseModel], flags: dict[str, str] | None) -> str:
    """One Markdown table per TOML table of `model`: the top-level keys, then each section."""
    top, sections = [], []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        inner, _ = _strip(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            sections.append((name, inner, info))
        else:
            top.append((name, info))
    parts = [_table(top, "", flags)]
    for name, sub, info in sections:
        head = f"### `[{name}]`\n\n"
        doc = info.description or _section_doc(sub)
        if doc:
            head += _text(doc) + "\n\n"
        parts.append(head + _table(list(sub.model_fields.items()), f"{name}.", flags))
    return "\n".join(parts)


def _table(fields: list[tuple[str, FieldInfo]], prefix: str, flags: dict[str, str] | None) -> str:
    cols = ["key", "type", "default", *(["flag"] if flags is not None else []), "meaning"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, info in fields:
        if info.exclude:
            continue
        key = f"{prefix}{name}"
        kind = ", ".join([_type(info.annotation), *_limits(info)])
        row = [f"`{key}`", _text(kind), _default(info)]
        if flags is not None:
            row.append(flags.get(key, ""))
        row.append(_text(info.description or ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def undocumented() -> list[str]:
    """Keys of the recipe and the profile without a description (every key must say what it does)."""
    missing = []
    for root, model in (("recipe", BuildRecipe), ("profile", TargetProfile)):
        for name, info in model.model_fields.items():
            inner, _ = _strip(info.annotation)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                missing += [f"{root} {name}.{k}" for k, i in inner.model_fields.items() if not i.description]
            elif not info.exclude and not info.description:
                missing.append(f"{root} {name}")
    return missing


def reference_markdown() -> str:
    """The text of docs/reference.md."""
    return (f"# Recipe and profile reference\n\n<!-- Generated from edgetl/recipe.py and edgetl/profiles.py by "
            f"`{COMMAND}`: edit the models' descriptions, not this file (tests/test_docs.py checks it). -->\n\n"
            f"## The recipe\n\n{RECIPE_INTRO}\n\n{_tables(BuildRecipe, _flags())}\n"
            f"## Target profiles\n\n{PROFILE_INTRO}\n\n{_tables(TargetProfile, None)}")


def main(argv: list[str]) -> int:
    """Write the reference to the path given (stdout without one)."""
    text = reference_markdown()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
