"""What do a model's content heads contribute? Validation loss and accuracy with their query/key logits switched off.

Usage: python bench/content/ablation.py CKPT [CKPT ...]. Evaluates each checkpoint on its first 64 validation
batches of 32 (the data it was trained on, as `lipcli convert` does), then again with softmax_scale set to 0: every
content head then attends by its position bias alone, and nothing else changes. The difference is what reading
content buys the model. On recall-cpu it is everything the model knows (a content-free model stays at the plateau).
"""

import sys

import torch

from lipcli import checkpoint
from lipcli.training import evaluate
from lipcli.validation import checkpoint_batches

BATCHES, BATCH_SIZE = 64, 32


def main(paths: list[str]) -> None:
    no_autocast = torch.autocast("cpu", enabled=False)
    for path in paths:
        ckpt = checkpoint.load(path)
        model = ckpt.model.eval()
        batches = checkpoint_batches(ckpt, None, BATCH_SIZE, BATCHES)[0]
        scale = model.config.softmax_scale
        on = evaluate(model, iter(batches), no_autocast)
        model.set_fixed_scales({"softmax_scale": 0.0})
        off = evaluate(model, iter(batches), no_autocast)
        print(
            f"{path}: softmax_scale {scale:g}: val acc {on['val_acc']:.2%}, loss {on['val_loss']:.4f}; content off: "
            f"{off['val_acc']:.2%}, {off['val_loss']:.4f} (acc {100 * (on['val_acc'] - off['val_acc']):+.2f} pts, "
            f"loss {off['val_loss'] - on['val_loss']:+.4f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
