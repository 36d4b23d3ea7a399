"""A Hugging Face Trainer with the one-line swap: a tiny BERT from a config (no download) on a
made-up sequence task, its orthogonality errors in the Trainer's own logs.

The task: 16 tokens of noise and one marker token, whose id is the label (10 classes).

    python examples/hf_trainer.py [--steps 200]

The Trainer prints its logs, the orthogonality errors among them; then the held-out accuracy
(100%) and the last logged largest max |WᵀW - I| (below 1e-2).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import orthoopt
from orthoopt.integrations.huggingface import OrthoCallback

MARKERS, NOISE, LENGTH = 10, 20, 16  # token 0 is [CLS], 1..10 the markers, 11..30 the noise


class Markers(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        tokens = 1 + MARKERS + torch.randint(NOISE, (n, LENGTH), generator=g)
        self.labels = torch.randint(MARKERS, (n,), generator=g)
        tokens[torch.arange(n), torch.randint(LENGTH, (n,), generator=g)] = 1 + self.labels
        self.ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), tokens], dim=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(steps: int = 200) -> dict[str, float]:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1 + MARKERS + NOISE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=LENGTH + 1,
        num_labels=MARKERS,
    )
    model = BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir,
            max_steps=steps,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            warmup_steps=0.1,
            logging_steps=max(1, steps // 4),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Markers(2000, seed=1))
        trainer.create_optimizer()  # the Trainer's own AdamW and groups (no decay on biases and norms)
        # The added lines: constrain every weight matrix but the classifier's, and log the errors.
        orthoopt.constrain_(trainer.optimizer, model, ortho=3.0, ortho_smoothing=1e-2, exclude=["classifier"])
        trainer.add_callback(OrthoCallback(trainer))
        trainer.train()
    last = [log for log in trainer.state.log_history if "ortho/max_error" in log][-1]
    test = Markers(500, seed=2)
    model.eval()
    with torch.no_grad():
        accuracy = (model(input_ids=test.ids).logits.argmax(1) == test.labels).float().mean().item()
    print(f"held-out accuracy {100 * accuracy:.1f}%; the last logged max |WᵀW - I| = {last['ortho/max_error']:.1e}")
    return {"accuracy": accuracy, **{k: v for k, v in last.items() if k.startswith("ortho/")}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
