"""Griffe extension (mkdocs.yml): prmem's docstrings use Sphinx roles
(:class:`Pool`, :func:`rare_write`, :meth:`get`); mkdocstrings renders
Markdown, so each role becomes a code span instead of showing its markup."""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
