"""The property of tests/test_soundness.py on many more examples: certify refuses, or its bound >= measured.

Draws random small LipschitzGPT / LipschitzMLP configurations (scales of any sign and 0, gains, biases,
position biases, GeLU/GroupSort, random weights, float32/bfloat16/float16 storage, some NaN/inf), certifies
each, and searches for the largest sensitivity on the certified domain. Prints one JSON object: examples,
refused, certified, the worst measured / bound ratio and its example; exits 1 on any violation.

    .venv/bin/python bench/soundness.py --examples 5000 [--steps 12] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

# The example strategies live with the CI-sized test, so both always draw from the same ranges.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import test_soundness  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=test_soundness.SEARCH["steps"], help="search steps per round")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    test_soundness.SEARCH["steps"] = args.steps
    ratios: list[tuple[float, str]] = []
    tiny: list[float] = []  # bounds too small for a float64 difference quotient to resolve
    refused = 0
    started = time.perf_counter()

    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        example=st.one_of(test_soundness.gpt_examples(), test_soundness.gpt_examples(), test_soundness.mlp_examples())
    )
    def run(example: test_soundness.Example) -> None:
        nonlocal refused
        result = test_soundness.check(example)
        if result is None:
            refused += 1
        # Below 100x the test's absolute floor a ratio measures float64 cancellation, not the bound: count it apart.
        elif result[1] > 100 * test_soundness.MEASUREMENT_FLOOR:
            ratios.append((result[0] / result[1], repr(example)))
        else:
            tiny.append(result[1])
        if args.out and (len(ratios) + len(tiny) + refused) % 100 == 0:  # progress survives an interrupted run
            args.out.write_text(json.dumps(summary(None), indent=2) + "\n")

    def summary(violation: str | None) -> dict:
        worst = max(ratios, default=(0.0, ""))
        return {
            "examples": len(ratios) + len(tiny) + refused,
            "refused": refused,
            "certified": len(ratios) + len(tiny),
            "certified_below_1e-6": len(tiny),
            "worst_measured_over_bound": worst[0],
            "worst_example": worst[1],
            "search_steps": args.steps,
            "violation": violation,
            "seconds": round(time.perf_counter() - started, 1),
        }

    violation = None
    try:
        seed(args.seed)(run)()
    except AssertionError as exc:
        violation = str(exc).splitlines()[0]
    text = json.dumps(summary(violation), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    sys.exit(1 if violation else 0)


if __name__ == "__main__":
    main()
