"""RDM's estimate against its cost: for each setting (directions iid or orthogonal, sort budget), how close
one draw's gradient is to the expected gradient (the mean of many draws of the paper's form: 2048 independent
directions on every row), how much the value spreads over draws, and the seconds of one forward + backward.

    python jobs/benchmark_rdm.py --rows 2176 --width 128

The rows are a two-component mixture (not the rectified Gaussian RDM pulls towards), as encoder outputs are
early in training; 2176 rows of width 128 is one source term of benchmark_scale.py's 64 sources. One thread.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from hetero_ray.denoise.rdm import projections_for, rdm

SETTINGS = [("iid", None), ("iid", 2048 * 512), ("orthogonal", None), ("orthogonal", 2048 * 512),
            ("orthogonal", 2048 * 256), ("orthogonal", 2048 * 128), ("orthogonal", 2048 * 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2176)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--draws", type=int, default=12, help="draws per setting")
    ap.add_argument("--reference-draws", type=int, default=32, help="draws of the paper's form averaged")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    a = int(args.rows * 0.6)
    z = torch.cat([torch.randn(a, args.width) * 0.5 + 0.4,
                   torch.randn(args.rows - a, args.width) * 1.5 - 0.2]).requires_grad_(True)

    def draw(seed: int, kind: str, budget: int | None) -> tuple[float, torch.Tensor, float]:
        t0 = time.perf_counter()
        loss = rdm(z, generator=torch.Generator().manual_seed(seed), sort_budget=budget, kind=kind)
        (g,) = torch.autograd.grad(loss, z)
        return float(loss), g.flatten(), time.perf_counter() - t0

    ref = [draw(10_000 + s, "iid", None) for s in range(args.reference_draws)]
    value = sum(v for v, _, _ in ref) / len(ref)
    grad = torch.stack([g for _, g, _ in ref]).mean(0)
    rows = []
    for kind, budget in SETTINGS:
        got = [draw(s, kind, budget) for s in range(args.draws)]
        cos = torch.tensor([float(F.cosine_similarity(g, grad, dim=0)) for _, g, _ in got])
        vals = torch.tensor([v for v, _, _ in got])
        rows.append({"directions": kind, "sort_budget": budget,
                     "projections": projections_for(args.rows, 2048, budget),
                     "grad_cosine_mean": round(float(cos.mean()), 3), "grad_cosine_min": round(float(cos.min()), 3),
                     "value_mean_over_expected": round(float(vals.mean()) / value, 4),
                     "value_sd_over_expected": round(float(vals.std()) / value, 4),
                     "seconds": round(min(t for _, _, t in got), 4)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.rows} rows of width {args.width}; gradient cosine of one draw to the mean of "
          f"{args.reference_draws} draws of the paper's form; {args.draws} draws per setting; one thread")
    print("\n| directions | sort budget | projections | grad cosine (mean, min) | value mean / expected | "
          "value sd / expected | s per forward + backward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        budget = "none" if r["sort_budget"] is None else f"2048 x {r['sort_budget'] // 2048}"
        print(f"| {r['directions']} | {budget} | {r['projections']} | {r['grad_cosine_mean']}, "
              f"{r['grad_cosine_min']} | {r['value_mean_over_expected']} | {r['value_sd_over_expected']} | "
              f"{r['seconds']} |")


if __name__ == "__main__":
    main()
