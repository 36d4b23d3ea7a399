"""``orthoopt.audit``: every weight of a model, what the constraint would do with it, and why.

The first thing to run before a swap: a table of every parameter of 2 or more dimensions
with its module type, shape, layout, the ``(m, l, n)`` of its matrices (one per piece of a
composite layout), whether it is constrained and why (or why not), and flags for what
deserves a look: a fused-looking name kept ``"auto"``, a parametrized weight left out, the
output layer, a depthwise conv, a positional module.  ``python -m orthoopt audit MODEL``
prints it for a timm model name, a transformers model type or config path, or a
``module:function`` that builds the model.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import wrappers
from .options import param_key, penalized
from .rule import Verdict, is_lazy, matrix_shapes, survey
from .selection import select

__all__ = ["audit", "Audit", "Row", "main", "build_model"]


@dataclass(frozen=True)
class Row:
    """One parameter: ``matrices`` holds the ``(m, l, n)`` of each piece (empty when it is left
    out or its layout does not fit); ``why`` says why it is constrained or left out."""

    name: str
    module: str
    shape: tuple[int, ...]
    layout: str | None
    matrices: tuple[tuple[int, int, int], ...]
    selected: bool
    why: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Audit:
    """The rows of :func:`audit`, in ``named_parameters`` order; ``str()`` is the table."""

    title: str
    rows: tuple[Row, ...]

    def row(self, name: str) -> Row:
        """The row of the parameter called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no parameter {name!r} in this audit; its parameters are named like {self.rows[0].name!r}")

    @property
    def selected(self) -> list[Row]:
        return [r for r in self.rows if r.selected]

    @property
    def flagged(self) -> list[Row]:
        return [r for r in self.rows if r.flags]

    def summary(self) -> str:
        left = Counter(r.why.split(" (")[0].split(":")[0] for r in self.rows if not r.selected)
        flags = Counter(f for r in self.rows for f in r.flags)
        lines = [f"{len(self.selected)} of {len(self.rows)} weights constrained"]
        lines += [f"  left out, {why}: {n}" for why, n in sorted(left.items())]
        lines += [f"  flagged, {flag}: {n}" for flag, n in sorted(flags.items())]
        return "\n".join(lines)

    def table(self, rows: Iterable[Row] | None = None) -> str:
        rows = list(self.rows if rows is None else rows)
        head = ("parameter", "module", "shape", "layout", "(m, l, n)", "on", "why", "flags")
        cells = [head] + [
            (
                r.name,
                r.module,
                "x".join(map(str, r.shape)),
                r.layout or "-",
                " + ".join(f"({m}, {l}, {n})" for m, l, n in r.matrices) or "-",
                "yes" if r.selected else "no",
                r.why,
                ", ".join(r.flags),
            )
            for r in rows
        ]
        widths = [min(max(len(c[i]) for c in cells), 60 if i == 6 else 200) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.title}\n\n{self.table()}\n\n{self.summary()}"


def audit(
    target: nn.Module | torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    layouts: dict[str, str] | None = None,
    layout: str | None = None,
) -> Audit:
    """The table of every parameter of 2 or more dimensions of ``target`` and what the
    constraint does with it.

    ``target`` is a model (what :func:`orthoopt.param_groups` would constrain with
    ``include``, ``exclude``, ``layouts`` and ``layout``, as there) or an optimizer, also
    inside a framework's wrapper: an orthoopt one shows its groups as they are; a plain one
    what :func:`orthoopt.constrain_` would do to it (pass ``model`` with it, which names the
    parameters and says what their layers are).
    """
    target = wrappers.unwrap(target)
    if isinstance(target, nn.Module):
        return _of_model(target, None, include, exclude, layouts, layout)
    if not isinstance(target, torch.optim.Optimizer):
        raise TypeError(f"audit takes a model (nn.Module) or an optimizer, got {type(target).__name__}")
    if any("ortho" in g for g in target.param_groups) and any(penalized(g) for g in target.param_groups):
        return _of_groups(target, model)
    if model is None:
        raise TypeError(
            f"audit of a plain {type(target).__name__} needs the model too: audit(optimizer, model), which shows "
            "what orthoopt.constrain_(optimizer, model) would constrain"
        )
    held = {id(p) for g in target.param_groups for p in g["params"]}
    return _of_model(model, held, include, exclude, layouts, layout)


def _of_model(
    model: nn.Module,
    among: set[int] | None,
    include: Any,
    exclude: Any,
    layouts: dict[str, str] | None,
    layout: str | None,
) -> Audit:
    verdicts = survey(model)
    chosen = select(
        model,
        include=include,
        exclude=exclude,
        layouts=layouts,
        layout=layout,
        among=among,
        where="audit",
        allow_empty=True,
    )
    picked = {id(p): spec for _, p, spec in chosen}
    rows = []
    for name, p in model.named_parameters():
        if p.dim() < 2 and not is_lazy(p):
            continue
        verdict = verdicts[id(p)]
        spec = picked.get(id(p), verdict.layout)
        rows.append(_row(name, p, verdict, spec, id(p) in picked, among))
    title = f"audit of {type(model).__name__}: {sum(r.selected for r in rows)} of {len(rows)} weights constrained"
    return Audit(title, tuple(rows))


def _row(name: str, p: torch.Tensor, verdict: Verdict, spec: str | None, on: bool, among: set[int] | None) -> Row:
    module = "" if verdict.module is None else type(verdict.module).__name__
    shape = tuple(p.shape) if not is_lazy(p) else ()
    if on:
        why = verdict.reason if verdict.selected else "include"
        if spec != verdict.layout:
            why = f"layout given ({why})" if verdict.selected else "include, layout given"
    elif among is not None and id(p) not in among:
        why = "not held by the optimizer"
    elif verdict.selected:
        why = "exclude"
    else:
        why = verdict.reason
    return Row(name, module, shape, spec, (matrix_shapes(spec, shape) or ()) if on else (), on, why, verdict.flags)


def _of_groups(optimizer: torch.optim.Optimizer, model: nn.Module | None) -> Audit:
    verdicts = survey(model) if model is not None else {}
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                continue
            name = names.get(id(p), param_key(group, i, gi))
            verdict = verdicts.get(id(p), Verdict(None, None, False, ""))
            on = penalized(group)
            spec = group.get("ortho_layout") if on else None
            why = f"group {gi}" + ("" if on else " (ortho=0)")
            rows.append(
                Row(name, "" if verdict.module is None else type(verdict.module).__name__, tuple(p.shape), spec,
                    (matrix_shapes(spec, tuple(p.shape)) or ()) if on else (), on, why, verdict.flags)
            )  # fmt: skip
    title = f"audit of {type(optimizer).__name__}: {sum(r.selected for r in rows)} of {len(rows)} weights constrained"
    return Audit(title, tuple(rows))


# -- the command line ------------------------------------------------------------------------------
def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (num_classes=10, hidden_size=64), got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orthoopt audit",
        description=(
            "List every weight of a model with its layout, the (m, l, n) of its matrices, whether the default rule "
            "constrains it and why, and flags for what to look at before the one-line swap."
        ),
    )
    p.add_argument(
        "model",
        help="a timm model name (resnet18), a transformers model type or config path (gpt_neox, ./my-config/), "
        "or module:function that returns the model (mypkg.models:build)",
    )
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword of timm.create_model, an attribute of the transformers config, or a keyword "
                   "of the function (repeatable)")  # fmt: skip
    p.add_argument("--auto-class", default="AutoModel",
                   help="the transformers class that builds the model from its config (default AutoModel; "
                   "AutoModelForCausalLM adds the language-model head)")  # fmt: skip
    p.add_argument("--include", action="append", default=None, help="an include pattern (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="an exclude pattern (repeatable)")
    p.add_argument("--show", choices=("all", "flagged", "selected", "left-out"), default="all",
                   help="which rows to print (default all; the summary counts all of them)")  # fmt: skip
    p.add_argument("--device", default="meta",
                   help="where to build the model (default meta: shapes only, no memory, no time; cpu for a "
                   "builder that needs real tensors)")  # fmt: skip
    return p


def build_model(spec: str, settings: dict[str, Any], auto_class: str = "AutoModel") -> nn.Module:
    """The model that ``spec`` names (see :func:`parser`), built with ``settings``."""
    module_name, sep, function = spec.partition(":")
    if sep:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a builder in the current folder, as python -m finds it
        builder = getattr(importlib.import_module(module_name), function, None)
        if not callable(builder):
            raise ValueError(f"{module_name!r} has no function {function!r} that builds a model")
        model = builder(**settings)
    elif _timm_knows(spec):
        import timm

        model = timm.create_model(spec, pretrained=False, **settings)
    else:
        model = _transformers_model(spec, settings, auto_class)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def _timm_knows(name: str) -> bool:
    try:
        import timm
    except Exception:  # noqa: BLE001 - not installed, or no torchvision for this torch
        return False
    return bool(timm.is_model(name))


def _transformers_model(spec: str, settings: dict[str, Any], auto_class: str) -> nn.Module:
    try:
        import transformers
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{spec!r} is not a timm model here, and transformers does not import ({type(e).__name__}: {e}); "
            "name a timm model, pip install transformers, or give module:function"
        ) from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec in CONFIG_MAPPING:
        config = transformers.AutoConfig.for_model(spec)
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001 - not found locally, and no network
            raise ValueError(
                f"{spec!r} is neither a timm model, nor a transformers model type (bert, gpt_neox, llama, ...), nor "
                f"a config that transformers could load ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
    for key, value in settings.items():
        setattr(config, key, value)
    cls = getattr(transformers, auto_class, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(
            f"--auto-class {auto_class!r} is not a transformers Auto class (AutoModel, AutoModelForCausalLM)"
        )
    return cls.from_config(config)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    settings = dict(args.settings)
    try:
        with torch.device(args.device):
            model = build_model(args.model, settings, args.auto_class)
        result = audit(model, include=args.include, exclude=args.exclude)
    except (ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"orthoopt audit: {e}", file=sys.stderr)
        return 2
    show = {
        "all": result.rows,
        "flagged": result.flagged,
        "selected": result.selected,
        "left-out": [r for r in result.rows if not r.selected],
    }[args.show]
    print(f"{result.title} ({args.model})\n\n{result.table(show)}\n\n{result.summary()}")
    return 0
