"""Benchmark: time to generate (in memory) and to write (NIfTI + datalist + CSV) synthetic cohorts.

Run: ``python scripts/bench_synthetic.py --kind sos --n 200 --size 48``
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from monai_gamverify.data.synthetic import KINDS, generate, make_cohort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kind", default="sos", choices=KINDS)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-memory", action="store_true", help="also time the in-memory generator")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.in_memory:
        t0 = time.perf_counter()
        generate(args.kind, n=args.n, size=args.size, seed=args.seed)
        dt = time.perf_counter() - t0
        print(f"generate  {args.kind} n={args.n} size={args.size}: {dt:.1f} s ({1000 * dt / args.n:.0f} ms/subject)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = make_cohort(args.kind, n=args.n, size=args.size, seed=args.seed, out_dir=tmp, progress=False)
        dt = time.perf_counter() - t0
    print(
        f"make_cohort {args.kind} n={args.n} size={args.size}: {dt:.1f} s ({1000 * dt / args.n:.0f} ms/subject, "
        f"NIfTI images+masks, datalist, CSV) splits={summary['splits']} target<30 s: {'PASS' if dt < 30 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
