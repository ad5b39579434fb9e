"""Does a content head read content? Its attention against its position-only pattern, on real text.

Usage: python bench/content/head_use.py CKPT. Prints, per layer with content heads, each head's mean total
variation between softmax(content logit + bias) and softmax(bias), the largest |content logit|, and the
first three bias entries (offsets 0, 1, 2). Text: the last 9 k characters of $LIPCLI_DATA_DIR/tinyshakespeare.txt.
"""

import os
import sys
from pathlib import Path

import torch

from lipcli import checkpoint
from lipcli.data import tokenizer_from_dict

BATCH, CONTEXT = 8, 128


def main(path: str) -> None:
    ckpt = checkpoint.load(path)
    model, tokenizer = ckpt.model.eval(), tokenizer_from_dict(ckpt.tokenizer)
    text = (Path(os.environ["LIPCLI_DATA_DIR"]) / "tinyshakespeare.txt").read_text()
    ids = torch.tensor(tokenizer.encode(text[-(BATCH * CONTEXT + 1000) :]))[: BATCH * CONTEXT].view(BATCH, CONTEXT)
    with torch.no_grad():
        x = model.embed(ids)
        for i, block in enumerate(model.blocks):
            attn, m = block.attn.inner, block.attn.inner.content_heads
            if m:
                bias = attn._bias(CONTEXT, x.device)[:m]
                logits = attn.logits(x)[:, :m]
                tv = 0.5 * (logits.softmax(-1) - bias.softmax(-1)).abs().sum(-1).mean((0, 2))
                content = (logits - bias).nan_to_num(0.0, 0.0, 0.0).abs().max()
                first = bias[:, -1, -3:].flip(-1).tolist()  # offsets 0, 1, 2 of the last query
                tvs = [f"{float(v):.2e}" for v in tv]
                print(f"block{i}: TV {tvs}, |content logit| <= {float(content):.2f}, bias {first}")
            x = block(x)


if __name__ == "__main__":
    main(sys.argv[1])
