"""Griffe extension: the package's reStructuredText docstrings read as Markdown.

orthoopt's docstrings are written for ``help()`` and Sphinx: ``:math:`...``` roles,
``.. math::`` blocks, ``:func:`...``` cross-references and ``::`` before a literal block.
mkdocstrings renders docstrings as Markdown, where these would show as raw markup, so this
extension rewrites them when griffe loads each object: math for pymdownx.arithmatex, the
other roles as code, ``::`` as ``:`` (the indented block after it is Markdown's code block).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`~?(?P<text>[^`]+)`")
DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*$")


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
    return line


def markdown(text: str) -> str:
    """``text``, a reStructuredText docstring, with its math and roles in Markdown."""
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
        while body and not body[-1]:
            body.pop()
        out += [" " * indent + "$$"] + [" " * indent + b for b in body if b] + [" " * indent + "$$", ""]
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
