"""MkDocs hook: the experiments' plots on the site, from where the experiment scripts write them.

Every PNG under ``experiments/results/`` is served as ``plots/<its path below results/>``, so
the results pages show the figures that the scripts wrote, without a copy in ``docs/``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def on_files(files, config, **kwargs):
    for png in sorted(RESULTS.rglob("*.png")):
        files.append(File.generated(config, "plots/" + png.relative_to(RESULTS).as_posix(), abs_src_path=str(png)))
    return files
