"""A griffe extension for the API pages: read Google ``Example:`` sections as ``Examples:``.

The package's docstrings say ``Example:`` (singular); griffe's Google parser treats only
``Examples:`` as doctest code and renders the singular as an admonition of plain Markdown, in
which doctest output such as ``[1, 3, 10]`` reads as a link. Used by mkdocs.yml.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

__all__ = ["ExampleSections"]

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` before the docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
