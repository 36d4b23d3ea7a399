"""MkDocs hook: serve MathJax from the site itself.

The pages' math is typeset by MathJax 3 in the reader's browser.  Its files come from the
``django-static-mathjax`` wheel (MathJax's own release, as static files; no Django needed),
which the ``docs`` extra installs, so that neither the build nor the built site needs a CDN.
Only what ``tex-chtml.js`` loads is copied: the component, its HTML-CSS fonts, the TeX
extensions it may load on demand, the menu and the accessibility extensions.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from mkdocs.exceptions import PluginError

# Relative to MathJax's es5/ folder.
PARTS = ("tex-chtml.js", "output/chtml", "input/tex/extensions", "ui", "a11y", "adaptors")


def _es5() -> Path:
    try:
        root = resources.files("mathjax") / "static" / "mathjax"
    except ModuleNotFoundError as error:
        raise PluginError(
            "MathJax is not installed: install the docs extra, pip install -e '.[docs]' (django-static-mathjax)"
        ) from error
    es5 = Path(str(root)) / "es5"
    if not (es5 / "tex-chtml.js").is_file():
        raise PluginError(f"MathJax's tex-chtml.js is not in {es5}: reinstall django-static-mathjax")
    return es5


def on_post_build(config, **kwargs) -> None:
    es5 = _es5()
    target = Path(config["site_dir"]) / "mathjax"
    for part in PARTS:
        source, destination = es5 / part, target / part
        if source.is_dir():
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    shutil.copy2(es5.parent / "LICENSE", target / "LICENSE")
