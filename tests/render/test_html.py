"""Page templates (convlens.render.html): static files inlined safely, autoescape, tojson."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from convlens.render import html


def test_every_static_file_can_be_inlined() -> None:
    static = resources.files("convlens") / "static"
    names = sorted(f.name for f in static.iterdir() if f.name.endswith((".css", ".js")))
    assert names == [
        "features.css",
        "report.css",
        "report.js",
        "serve.css",
        "serve.js",
        "serve_features.js",
    ]
    for name in names:
        assert str(html.static_text(name)).strip()


@pytest.mark.parametrize("text", ['x = "</script>";', "a::after{content:'</STYLE >'}", "<!-- x"])
def test_static_text_refuses_what_would_end_its_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    (tmp_path / "static").mkdir()
    name = f"bad{abs(hash(text))}.js"  # static_text caches by name
    (tmp_path / "static" / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(html.resources, "files", lambda package: tmp_path)
    with pytest.raises(ValueError, match="cannot be inlined"):
        html.static_text(name)


def test_templates_autoescape_and_show_undecodable_bytes() -> None:
    env = html._environment()
    template = env.from_string("<p>{{ text }}</p><script>{{ data|tojson }}</script>")
    text = "</p><script>alert('x')</script>&{{ 1 }}" + "\udcff"
    page = template.render(text=text, data={"name": text})
    assert page.startswith(
        "<p>&lt;/p&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;{{ 1 }}\\xff</p>"
    )
    assert page.endswith(
        '<script>{"name":"\\u003c/p\\u003e\\u003cscript\\u003ealert(\\u0027x\\u0027)'
        '\\u003c/script\\u003e\\u0026{{ 1 }}\\udcff"}</script>'
    )
    assert env.list_templates() and all(env.autoescape(n) for n in env.list_templates())
