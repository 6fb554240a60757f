"""HTML pages from the Jinja2 templates in ``convlens/templates`` (autoescaped).

Every page convlens writes (the error-analysis report, the feature browser) is rendered here:

- every template is autoescaped, so text from the data set (file names, class names, model
  names) is HTML-escaped wherever it is written with ``{{ }}``;
- every string written with ``{{ }}`` first goes through :func:`convlens.console.printable`, so
  the undecodable bytes of a file name show as ``\\xff`` (they cannot be written as UTF-8);
- data for scripts goes through the ``tojson`` filter, which escapes ``<``, ``>``, ``&`` and
  ``'`` so that no string can close the ``<script>`` element that holds it;
- the style sheets and scripts are package data (``convlens/static``), inlined with
  ``{{ static("report.css") }}`` so that each page works offline as a single file.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

import jinja2
from markupsafe import Markup

from convlens.console import printable

__all__ = ["render_page", "static_text"]

# what ends (or confuses the end of) an inline <style> or <script> element
_UNSAFE_INLINE = re.compile(r"</(?:style|script)|<!--", re.IGNORECASE)


def _finalize(value: object) -> object:
    # Markup is already safe HTML (static files, tojson); plain text is made printable here and
    # escaped by autoescape after.
    if isinstance(value, str) and not isinstance(value, Markup):
        return printable(value)
    return value


def _fmt(value: object, spec: str) -> str:
    """``format(value, spec)``: ``{{ x|fmt(".3f") }}``."""
    return format(value, spec)


@functools.cache
def static_text(name: str) -> Markup:
    """The text of the static file ``convlens/static/<name>``, to inline in a page.

    Args:
        name: file name of a style sheet or script under ``convlens/static``.

    Returns:
        The text as :class:`~markupsafe.Markup` (it is written unescaped).

    Raises:
        ValueError: the file would end the ``<style>`` or ``<script>`` element it is inlined in
            (it holds ``</style``, ``</script`` or ``<!--``), which is a packaging bug.
    """
    text = (resources.files("convlens") / "static" / name).read_text(encoding="utf-8")
    if _UNSAFE_INLINE.search(text):
        raise ValueError(
            f"convlens/static/{name} cannot be inlined: it matches {_UNSAFE_INLINE.pattern}"
        )
    return Markup(text)


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("convlens", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt
    env.globals["static"] = static_text
    # compact script data; ASCII only, so that no character needs a particular encoding
    env.policies["json.dumps_function"] = json.dumps
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":"), "allow_nan": False}
    return env


def render_page(template: str, **context: object) -> str:
    """Render the template ``convlens/templates/<template>`` with ``context``.

    Args:
        template: file name of the template, e.g. ``"report_index.html.j2"``.
        **context: the template's variables.

    Returns:
        The page's HTML text.
    """
    return _environment().get_template(template).render(**context)
