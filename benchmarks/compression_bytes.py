"""Bytes each rank hands to the all-reduce per step, per compressor, for the digits MLP and overlap's sized MLP.

    python benchmarks/compression_bytes.py [--out PATH.txt]

Computed, not timed: DistributedOptimizer(compression=c).compression_report()'s bytes of one
compressed step (payload_bytes), against none's (the float32 gradients). They follow from
the shapes alone: PowerSGD sends (n + m) x r per n x m matrix (P, then Q) and the vectors
uncompressed; fp16/bf16 half of everything. A ring all-reduce moves 2(p-1)/p of them per rank.
The models: ringsync-train's digits MLP (64-128-64-10) and benchmarks/overlap.py's sized MLP
(1024-2048-2048-2048-10). One process, no launcher needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

MODELS = {"digits": [64, 128, 64, 10], "sized": [1024, 2048, 2048, 2048, 10]}


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="compression_bytes.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", metavar="PATH.txt", help="also write the table here (atomically)")
    args = ap.parse_args(argv)
    import ringsync as rs
    from ringsync.training.compression import Compression, PowerSGD
    from ringsync.training.nn import MLP
    from ringsync.training.optim import SGD, DistributedOptimizer

    rs.init()
    lines = ["# bytes per rank handed to the all-reduce per step (computed from the shapes), and none's / this",
             f"# {'model':<8} {'compressor':<12} {'bytes/step':>12} {'ratio':>8}"]
    for model, sizes in MODELS.items():
        for label, c in (("none", Compression.none), ("fp16", Compression.fp16), ("bf16", Compression.bf16),
                         ("powersgd:1", PowerSGD(rank=1)), ("powersgd:4", PowerSGD(rank=4))):
            try:
                opt = DistributedOptimizer(SGD(MLP(sizes, seed=0).params, lr=0.0), compression=c)
            except ImportError:
                lines.append(f"  {model:<8} {label:<12} {'(needs ml_dtypes)':>21}")
                continue
            report = opt.compression_report()
            step, full = report["compressed_step_bytes"], report["uncompressed_bytes_per_step"]
            lines.append(f"  {model:<8} {label:<12} {step:>12,.0f} {full / step:>8.2f}")
    rs.shutdown()
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        bl.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
