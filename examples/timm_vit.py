"""A timm model under timm's own optimizer and scheduler, with the one-line swap: a small ViT
built from its config (no download) on scikit-learn's 8 × 8 digits.

    python examples/timm_vit.py [--epochs 4]

It prints the training accuracy (84%) and the largest max |WᵀW - I| of the 9 constrained
weights (below 1e-3).
"""

from __future__ import annotations

import argparse

import timm
import torch
from sklearn.datasets import load_digits
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

import orthoopt


def main(epochs: int = 4, batch_size: int = 64) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor((x - x.mean()) / x.std(), dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1, depth=2, num_classes=10
    )
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)  # timm's groups: no decay on norms
    # The added line: the attention, MLP and patch weights; β from the update ('auto').
    orthoopt.constrain_(optimizer, model, ortho="auto", exclude=["head"])
    updates_per_epoch = -(-len(y) // batch_size)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs, updates_per_epoch=updates_per_epoch)
    updates = 0
    for epoch in range(epochs):
        for batch in torch.randperm(len(y)).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch + 1)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    errors = orthoopt.named_orthogonality_errors(optimizer)
    print(f"training accuracy {100 * accuracy:.1f}%; {len(errors)} constrained weights, the largest")
    print(f"max |WᵀW - I| = {max(errors.values()):.1e} ({max(errors, key=errors.get)})")
    return {"accuracy": accuracy, **errors}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    main(parser.parse_args().epochs)
