"""What ortho_tol costs: the whole training iteration of a 2-layer LSTM language model under
AdamW at a constant learning rate, soft with ortho_tol against soft without it.

Both run side by side in one process, each round timing one iteration of each in turn (so a
change of machine load hits both alike); the figures are the medians over the rounds after a
warm-up, with the interquartile range.  It also prints how often the correction ran, and the
largest error after any step of each.

    python tools/bench_ortho_tol.py [--lr 2e-2] [--tol 1e-2] [--rounds 200] [--width 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import orthoopt


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=2)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.lstm(self.embedding(tokens))[0])


def _contender(args, tol):
    torch.manual_seed(0)
    model = LanguageModel(args.vocab, args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    options = {} if tol is None else {"ortho_tol": tol}
    orthoopt.constrain_(opt, model, ortho=1.0, exclude=["embedding", "decoder"], **options)
    tokens = torch.randint(0, args.vocab, (args.seq + 1, args.batch), generator=torch.Generator().manual_seed(1))
    worst = [0.0]

    def iteration() -> None:
        opt.zero_grad()
        logits = model(tokens[:-1])
        nn.functional.cross_entropy(logits.reshape(-1, args.vocab), tokens[1:].reshape(-1)).backward()
        opt.step()

    def check() -> None:
        worst[0] = max(worst[0], max(opt.orthogonality_errors().values()))

    return iteration, check, opt, worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--width", type=int, default=200)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seq", type=int, default=35)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", orthoopt.guard.OrthogonalityWarning)  # the run without it drifts
    runs = {"soft": _contender(args, None), f"soft, ortho_tol={args.tol:g}": _contender(args, args.tol)}
    times = {name: [] for name in runs}
    for k in range(args.warmup + args.rounds):
        for name, (iteration, check, _, _) in runs.items():
            t0 = time.perf_counter()
            iteration()
            if k >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            check()  # untimed
    base = statistics.median(times["soft"])
    print(
        f"2-layer LSTM LM, width {args.width}, AdamW lr {args.lr:g} (constant), {args.rounds} rounds, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for name, (_, _, opt, worst) in runs.items():
        q = statistics.quantiles(times[name], n=4)
        ms = statistics.median(times[name]) * 1e3
        corrections = sum(opt.ortho_tol_corrections().values()) if "ortho_tol" in name else 0
        print(
            f"  {name:24s} {ms:8.2f} ms (IQR {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f})  x{ms / (base * 1e3):.2f}  "
            f"max error after a step {worst[0]:.3g}  corrections {corrections} "
            f"(matrix-steps, of {4 * 4 * (args.warmup + args.rounds)})"
        )


if __name__ == "__main__":
    main()
