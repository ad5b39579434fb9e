"""Which attention layers recall needs amplified: recall-cpu trained with a different output scale per layer.

The model config has one attn_out_scale for every layer, so this probe sets each block's scale on the built
model (in this process only: a checkpoint written here records the config's scale, not the per-layer ones, and
is certified here under the same override, then deleted). Prints accuracy, certified bound and measured
sensitivity per layout; the figures are in bench/RESULTS.md ("Can one set of scales serve both presets?").

    .venv/bin/python bench/recall/layer_scales.py                 # layouts 3,1  1,3  3,3
    .venv/bin/python bench/recall/layer_scales.py --layouts 2,3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lipcli.certification import certify
from lipcli.models import LipschitzGPT
from lipcli.presets import load_preset
from lipcli.sensitivity import checkpoint_sensitivity
from lipcli.training import train


def per_layer(scales: list[float]) -> Callable[[], None]:
    """Give block i attention output scale scales[i] whenever a LipschitzGPT is built or its scales are set."""
    built, set_scales = LipschitzGPT.__init__, LipschitzGPT.set_fixed_scales

    def apply(model: LipschitzGPT) -> None:
        for block, scale in zip(model.blocks, scales, strict=True):
            block.attn.inner.out_scale = scale

    def init(model: LipschitzGPT, *args: object, **kwargs: object) -> None:
        built(model, *args, **kwargs)  # type: ignore[arg-type]
        apply(model)

    def set_fixed_scales(model: LipschitzGPT, values: dict[str, float]) -> None:
        set_scales(model, values)
        apply(model)

    LipschitzGPT.__init__, LipschitzGPT.set_fixed_scales = init, set_fixed_scales  # type: ignore[method-assign]

    def restore() -> None:
        LipschitzGPT.__init__, LipschitzGPT.set_fixed_scales = built, set_scales  # type: ignore[method-assign]

    return restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="*", default=["3,1", "1,3", "3,3"], help="per-layer scales, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_preset("recall-cpu")
    layouts = [[float(v) for v in layout.split(",")] for layout in args.layouts]
    if any(len(scales) != preset.model["n_layers"] for scales in layouts):
        parser.error(f"each layout needs one scale per layer: recall-cpu has {preset.model['n_layers']}")
    for scales in layouts:
        restore = per_layer(scales)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "recall.safetensors"
                result = train(preset, out)
                bound = 10 ** certify(str(out)).to_dict()["log10_tight"]
                measured = checkpoint_sensitivity(str(out))
        finally:
            restore()
        acc = result.metrics["val_acc"]
        print(json.dumps({"layout": scales, "val_acc": acc, "bound": bound, "measured": measured}))


if __name__ == "__main__":
    main()
