"""Four framework training scripts with the one-line swap: errors, task metric, time.

For each script of ``tests/integration/training_scripts.py`` (the mnist CNN under Adadelta, the
LSTM language model under AdamW, timm's vit_tiny, a tiny BERT under Hugging Face's Trainer) it
runs the script as written ("plain") and with the swap (soft at β = 1 and at the recipe's β,
soft ``ortho='auto'``, hard), and reports the final max error of each constrained parameter,
the held-out loss and metric, and the whole-iteration time (forward, backward, step) against
the plain run: medians over all iterations, the variants stepped round-robin in one process
(each with its own RNG state, so every run is the same as alone). The Trainer's loop cannot be
interleaved: its variants run one after the other.  A second section is the
word_language_model's own sizes (emsize = nhid = 200, bptt 35, batch 20), one matrix per weight (each
``(800, 200)`` LSTM weight as one matrix, ``ortho_layout='columns'``) against the per-gate
default, fixed β against ``'auto'``, constant against cosine learning rate.

    python tools/integration_scripts.py [--quick] [--skip-lstm-sizes]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT / "tests" / "integration")]
import training_scripts as ts  # noqa: E402
from _common import parser, setup  # noqa: E402 - the experiments' arguments and results folder

from orthoopt.guard import OrthogonalityWarning  # noqa: E402

VARIANTS = {
    "plain": None,
    "soft β=1": {**ts.RECIPES["soft"], "ortho": 1.0},
    f"soft β={ts.SOFT_BETA:g}": ts.RECIPES["soft"],
    "soft auto": ts.RECIPES["auto"],
    "hard": ts.RECIPES["hard"],
}
# The settings the integration tests use (tests/integration/test_*.py).
SCRIPTS = {
    "mnist CNN, Adadelta + StepLR": (lambda o, q: ts.mnist_cnn(o, side=16, epochs=2 if q else 8), "hard refused"),
    "LSTM LM, AdamW + cosine": (lambda o, q: ts.word_lm(o, epochs=1 if q else 8, lr=1e-2), None),
    "timm vit_tiny, create_optimizer_v2 + cosine": (
        lambda o, q: ts.timm_vit(o, patch_size=4, epochs=1 if q else 8),
        None,
    ),
}


def interleave(scripts: dict[str, object]) -> tuple[dict[str, ts.Run], dict[str, list[str]]]:
    """Step the script generators round-robin, each under its own RNG state; their runs and warnings."""
    states = {name: torch.get_rng_state() for name in scripts}
    runs, alive, warned = {}, dict(scripts), {name: [] for name in scripts}
    while alive:
        for name, script in list(alive.items()):
            torch.set_rng_state(states[name])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", OrthogonalityWarning)
                try:
                    next(script)
                except StopIteration as done:
                    runs[name] = done.value
                    del alive[name]
            warned[name] += [str(w.message) for w in caught if issubclass(w.category, OrthogonalityWarning)]
            states[name] = torch.get_rng_state()
    return runs, warned


def median_ms(run: ts.Run) -> float:
    return 1e3 * statistics.median(run.times)


def script_rows(title: str, runs: dict[str, ts.Run], warned: dict[str, list[str]], refused: str | None) -> dict:
    plain = runs["plain"]
    rows = []
    for variant, run in runs.items():
        rows.append(
            {
                "variant": variant,
                "loss": run.loss,
                "loss_ratio": run.loss / plain.loss,
                "metric": run.metric,
                "metric_name": run.metric_name,
                "max_error": max(run.errors.values()),
                "errors": run.errors,
                "start_errors": run.start_errors,
                "iteration_ms": median_ms(run),
                "time_ratio": median_ms(run) / median_ms(plain),
                "steps": run.steps,
                "warnings": warned.get(variant, []),
            }
        )
    return {"script": title, "rows": rows, "refused": refused}


def markdown(result: dict) -> str:
    rows = result["rows"]
    metric = rows[0]["metric_name"]
    lines = [
        f"### {result['script']} ({rows[0]['steps']} iterations)",
        "",
        f"| variant | held-out loss | / plain | {metric} | max error | iteration ms | / plain | warnings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['loss']:.4f} | {r['loss_ratio']:.2f} | {r['metric']:.2f} | {r['max_error']:.2e} | "
            f"{r['iteration_ms']:.1f} | {r['time_ratio']:.2f} | {len(r['warnings'])} |"
        )
    if result["refused"]:
        lines.append(f"| hard | {result['refused']} | | | | | | |")
    names = list(rows[0]["errors"])
    lines += ["", "Final max error per constrained parameter (start: at initialisation):", ""]
    lines.append("| parameter | start | " + " | ".join(r["variant"] for r in rows) + " |")
    lines.append("|---|---|" + "---|" * len(rows))
    for name in names:
        cells = " | ".join(f"{r['errors'][name]:.2e}" for r in rows)
        lines.append(f"| {name} | {rows[0]['start_errors'][name]:.2f} | {cells} |")
    return "\n".join(lines)


def four_scripts(quick: bool) -> list[dict]:
    results = []
    for title, (make, refused) in SCRIPTS.items():
        try:
            scripts = {v: make(o, quick) for v, o in VARIANTS.items() if not (refused and v == "hard")}
            runs, warned = interleave(scripts)
        except ImportError as e:  # timm needs a torchvision that imports with this torch
            print(f"{title}: skipped ({e})")
            continue
        results.append(script_rows(title, runs, warned, refused))
        print(markdown(results[-1]), flush=True)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"BERT: skipped ({e})")
        return results
    runs, warned = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for variant, options in VARIANTS.items():  # the Trainer's loop: one variant after the other
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", OrthogonalityWarning)
                runs[variant] = ts.run(ts.hf_bert(options, out, epochs=1 if quick else 4))
            warned[variant] = [str(w.message) for w in caught if issubclass(w.category, OrthogonalityWarning)]
    results.append(script_rows("tiny BERT, HF Trainer (variants one after another)", runs, warned, None))
    print(markdown(results[-1]), flush=True)
    return results


LSTM_SIZES = [
    ("columns (old)", {"ortho_layout": "columns"}),
    ("row_groups:4 (default)", {}),
]


def lstm_sizes(quick: bool) -> list[dict]:
    """The LSTM at the example's sizes: layout x β x learning-rate schedule."""
    sizes = dict(emsize=200, nhid=200, batch_size=20, bptt=35, tokens=40_000, epochs=1 if quick else 3)
    rows = []
    for cosine in (False, True):
        for layout, extra in LSTM_SIZES:
            for beta in (ts.SOFT_BETA, "auto"):
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", OrthogonalityWarning)
                    run = ts.run(ts.word_lm({"ortho": beta, **extra}, lr=5e-3, cosine=cosine, record_every=50, **sizes))
                drift = [str(w.message) for w in caught if "moving away" in str(w.message)]
                rows.append(
                    {
                        "layout": layout,
                        "ortho": beta,
                        "lr": "cosine from 5e-3" if cosine else "5e-3 (÷4 on a plateau)",
                        "errors": run.errors,
                        "history": run.history,
                        "drift_warnings": drift,
                        "loss": run.loss,
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(lstm_sizes_row(rows[-1]), flush=True)
    return rows


def lstm_sizes_row(r: dict) -> str:
    errors = " / ".join(
        f"{r['errors'][f'rnn.{w}']:.2g}" for w in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1")
    )
    warned = sorted({m.split("'")[1].removeprefix("rnn.") for m in r["drift_warnings"]})
    return f"| {r['layout']} | {r['ortho']} | {r['lr']} | {errors} | {', '.join(warned) or '-'} |"


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--skip-lstm-sizes", action="store_true")
    args = p.parse_args(argv)
    out = setup(args, "integration")
    sections = [
        "# Four training scripts with the one-line swap",
        f"`python tools/integration_scripts.py{' --quick' if args.quick else ''}` (torch {torch.__version__}, "
        f"{args.threads} thread(s), this shared 2-core CPU: times are medians of whole iterations, "
        "compare them only within a table).",
    ]
    results = four_scripts(args.quick)
    sections += [markdown(r) for r in results]
    lstm_sizes_rows = [] if args.skip_lstm_sizes else lstm_sizes(args.quick)
    if lstm_sizes_rows:
        sections += [
            "## The LSTM at the example's sizes (emsize = nhid = 200), AdamW",
            "Final max error of weight_ih_l0 / weight_hh_l0 / weight_ih_l1 / weight_hh_l1 (in the "
            "optimizer's own layout), and the parameters that got the drift OrthogonalityWarning:",
            "| layout | ortho | lr | final max error | drift warned |\n|---|---|---|---|---|\n"
            + "\n".join(lstm_sizes_row(r) for r in lstm_sizes_rows),
        ]
    (out / "results.json").write_text(
        json.dumps({"scripts": results, "lstm_sizes": lstm_sizes_rows}, indent=1, default=str)
    )
    (out / "README.md").write_text("\n\n".join(sections) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
