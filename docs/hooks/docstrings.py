"""Griffe extension: the package's docstrings as mkdocstrings renders them.

orthoopt's docstrings are reStructuredText, written for ``help()`` and Sphinx: ``:math:`...```
roles, ``.. math::`` blocks, ``:func:`...``` cross-references, ``::`` before a literal block,
and options listed as ``name (type): meaning`` lines.  mkdocstrings renders docstrings as
Markdown, where these would show as raw markup or run together, so this extension rewrites
them when griffe loads each object: math for pymdownx.arithmatex, the other roles as code,
``::`` as ``:`` (the indented block after it is Markdown's code block), and the option lines
as a list.  A class whose docstring is set at import (``__doc__ = TEMPLATE.format(...)``), which
griffe's static analysis cannot see, gets the docstring it has at run time.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`~?(?P<text>[^`]+)`")
DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*$")
OPTION = re.compile(r"^(?P<name>\w+) \((?P<type>[^)]*)\): (?P<text>.*)$")


def _inline(line: str) -> str:
    def replace(match: re.Match) -> str:
        role, text = match["role"], match["text"]
        if role == "math":
            return "$" + text + "$"
        return "`" + text + "`"

    line = ROLE.sub(replace, line)
    if line.rstrip().endswith(" ::"):  # "text ::" (or a lone "::") introduces a literal block
        line = line.rstrip()[:-3].rstrip()
    elif line.endswith("::"):  # "text::" is "text:" followed by a literal block
        line = line[:-1]
    option = OPTION.match(line)
    if option:
        line = f"- `{option['name']}` ({option['type']}): {option['text']}"
    return line


def markdown(text: str) -> str:
    """``text``, a reStructuredText docstring, in Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        directive = DIRECTIVE.match(lines[i])
        if not directive:
            out.append(_inline(lines[i]))
            i += 1
            continue
        indent = len(directive["indent"])
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i].strip())
            i += 1
        out += [" " * indent + "$$"] + [" " * indent + b for b in body if b] + [" " * indent + "$$", ""]
    return "\n".join(out)


def _runtime_docstring(obj: griffe.Object) -> str | None:
    try:
        with warnings.catch_warnings():  # geoopt's import-time DeprecationWarning of torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            runtime = griffe.dynamic_import(obj.path)
    except Exception:  # noqa: BLE001 - not importable here: keep what static analysis found
        return None
    doc = vars(runtime).get("__doc__") if inspect.isclass(runtime) else None
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


class Docstrings(griffe.Extension):
    def on_class_instance(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if cls.docstring is None:
            doc = _runtime_docstring(cls)
            if doc is not None:
                cls.docstring = griffe.Docstring(markdown(doc), parent=cls)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
