"""Sphinx configuration for greenscope's documentation.

Why Sphinx: greenscope's docstrings are reStructuredText written for Sphinx (the
``:func:``, ``:class:`` and ``:mod:`` roles, double-backquoted literals,
``.. versionadded::``), which ``sphinx.ext.autodoc`` renders natively into the API
reference, cross-linked with the guides. MyST-Parser lets the guides stay Markdown, like
the README, so they read well on GitHub too. The theme is Furo.

Build (what ``make docs`` runs; warnings are errors)::

    .venv/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html

``tests/test_docs.py`` runs the same build into a temporary directory, and runs the
Python examples of every page.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# autodoc imports greenscope from this checkout, installed or not.
sys.path.insert(0, str(ROOT))

import greenscope  # noqa: E402  (needs the path above)

project = "greenscope"
author = "greenscope developers"
copyright = "greenscope developers"
release = greenscope.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",  # Markdown pages (CommonMark + directives in ```{name} fences)
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- MyST --------------------------------------------------------------------------------
# Anchors for headings down to ###, so `[...](guarantees.md#hung-databases)` works here as
# it does on GitHub.
myst_heading_anchors = 3

# -- autodoc -----------------------------------------------------------------------------
autodoc_member_order = "bysource"
# A method greenscope overrides without a docstring of its own (GeventWorker.run) would
# otherwise show gunicorn's docstring as if it were greenscope's.
autodoc_inherit_docstrings = False
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

# -- nitpicky (-n): every reference must resolve -----------------------------------------
# There is no intersphinx (the build must not need the network), so references to
# SQLAlchemy, gevent, greenlet, Flask, Celery, gunicorn and the standard library cannot
# resolve: they are listed here. A reference to greenscope's own API never is.
nitpick_ignore_regex = [
    (r"py:.*", r"(sqlalchemy|gevent|greenlet|flask|flask_sqlalchemy|celery|gunicorn)(\..*)?"),
    (r"py:.*", r"(gc|typing|collections\.abc|types|contextlib|threading|weakref|datetime)\..*"),
    # Private names in signatures: type variables (greenscope._registry._T) and helpers
    # (greenscope.gunicorn._PyWSGIHandler). Not part of the API, so not documented.
    (r"py:.*", r"greenscope(\.\w+)*\._\w+"),
    # greenscope.wsgi's type of WSGI's start_response, a Protocol outside its __all__.
    (r"py:class", r"greenscope\.wsgi\.StartResponse"),
    # Sphinx splits a dataclass field's annotation at its first comma when it renders the
    # field (greenscope.metrics.Collected's dict[str, list[float]]), and the left half
    # cannot resolve.
    (r"py:class", r"dict\[str"),
]
nitpick_ignore: list[tuple[str, str]] = []

# -- HTML --------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"greenscope {release}"
html_static_path: list[str] = []
