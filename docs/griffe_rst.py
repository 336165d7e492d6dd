"""A griffe extension: turn the reST bits of the package's docstrings into Markdown.

The docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``) with two
reST habits that Markdown would show verbatim: ``Example::`` before a doctest
and ``.. warning::`` directives, plus cross-reference roles such as
``:func:`~lightning_meta.materialize```. This rewrites them when mkdocstrings
loads the package; the source is not touched. Listed in ``mkdocs.yml`` under
``plugins.mkdocstrings.handlers.python.options.extensions``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

# :func:`~pkg.name` / :class:`pkg.Name` / :meth:`name` ... -> `name`
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. (warning|note|tip|important)::\s*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    # `~a.b.c` shows only the last component, as Sphinx does.
    short = target.rsplit(".", 1)[-1] if match.group(0).find("~") != -1 else target
    return f"`{short}`"


def rst_to_markdown(text: str) -> str:
    """Return ``text`` with reST roles, ``Example::`` and directives in Google/Markdown form."""
    text = _ROLE.sub(_role, text)
    text = re.sub(r"^(\s*)Examples?::\s*$", r"\1Examples:", text, flags=re.MULTILINE)
    text = _DIRECTIVE.sub(lambda m: f"{m.group(1)}{m.group(2).capitalize()}:", text)
    # Sphinx escapes a plural after a role ("MetaTemplate\\ s"); Markdown needs none.
    return text.replace("\\ s", "s").replace("\\\\ s", "s")


class RstToMarkdown(Extension):
    """Rewrite every docstring as it is loaded."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
