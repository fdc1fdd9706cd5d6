"""Benchmark: is the built-in redaction linear-time on adversarial text?

The built-in e-mail pattern once rescanned a run of letters without "@" from every one of its
positions (quadratic: 48,000 letters took 4.9 s, holding the GIL while a feedback post was redacted).
This prints, for texts of 1x, 4x and 16x the base size (letters, dotted words, spaced digits and a
mix; 256 KiB, 1 MiB and 4 MiB characters by default), the best of several timings and the ratio to the
1x time: linear-time redaction stays near 4 and 16, quadratic near 16 and 256. (Below ~100,000
characters the timings are too small to compare on a busy machine.)

Run:  python benchmarks/redaction.py [--size 262144] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time

from vllm_surgery.traffic.redaction import redact_text

KINDS = {
    "letters": lambda n: "a" * n,
    "dotted words": lambda n: "ab." * (n // 3),
    "spaced digits": lambda n: "1 " * (n // 2),
    "mixed": lambda n: ("name.surname+tag" + "9" * 6 + " ") * (n // 23),
}


def best_of(text: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        redact_text(text)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=262144, help="base text size in characters (default 262144)")
    p.add_argument("--repeat", type=int, default=3, help="timings per text, the best is kept (default 3)")
    args = p.parse_args(argv)
    print(
        f"{'text':<14} {'1x (s)':>9} {'4x / 1x':>8} {'16x / 1x':>9}   (linear: ~4 and ~16; quadratic: ~16 and ~256)"
    )
    for kind, make in KINDS.items():
        base = best_of(make(args.size), args.repeat)
        ratios = [best_of(make(args.size * k), args.repeat) / base for k in (4, 16)]
        print(f"{kind:<14} {base:9.5f} {ratios[0]:8.1f} {ratios[1]:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
