"""The trainer on digits with each gradient compressor: samples and time to the lab's target.

    python benchmarks/compression_digits.py --ranks 4 --out benchmarks/results/compression_digits

One `ringsync-train` job per compressor (none, fp16, bf16, powersgd:1, powersgd:4, and
powersgd:1 without error feedback), with the sync lab's hyperparameters (lr 0.1, momentum
0.5, batch 32 per rank, 20 epochs, seed 0, target test accuracy 0.95): final accuracy,
samples and seconds to the target, bytes all-reduced per step and the compression ratio
(from the trainer's report). Accuracy is what it measures; the wall times are one run each.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl

RUNS = (("none", []), ("fp16 +ef", ["--compression", "fp16", "--error-feedback"]),
        ("bf16 +ef", ["--compression", "bf16", "--error-feedback"]),
        ("powersgd:1", ["--compression", "powersgd:1"]), ("powersgd:4", ["--compression", "powersgd:4"]),
        ("powersgd:1 -ef", ["--compression", "powersgd:1", "--no-error-feedback"]))


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="compression_digits.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=bl.positive_int, default=4, help="ranks (4)")
    ap.add_argument("--epochs", type=bl.positive_int, default=20, help="epochs per run (20)")
    ap.add_argument("--mpiexec", default=bl.default_mpiexec(), help="the launcher (this venv's)")
    ap.add_argument("--timeout", type=bl.positive_int, default=600, help="seconds per run (600)")
    ap.add_argument("--out", help="path prefix of the .txt and .json")
    args = ap.parse_args(argv)
    base = ["--epochs", str(args.epochs), "--batch-size", "32", "--lr", "0.1", "--momentum", "0.5",
            "--seed", "0", "--target-accuracy", "0.95"]
    rows = []
    for name, flags in RUNS:
        try:
            doc = bl.run_train(args.mpiexec, args.ranks, base + flags, timeout=args.timeout)
        except (RuntimeError, OSError) as exc:
            print(f"compression_digits.py: {name}: {exc}", file=sys.stderr)
            return 1
        rows.append({"run": name, "final_accuracy": doc["test_accuracy"],
                     "samples_to_target": doc.get("samples_to_accuracy"),
                     "seconds_to_target": doc.get("time_to_accuracy_s"), "wall_s": doc.get("train_seconds"),
                     "payload_bytes_per_step": doc.get("payload_bytes_per_step"),
                     "compression_ratio": doc.get("compression_ratio"),
                     "fp16_fallbacks": doc.get("fp16_fallbacks")})
        print(f"  {name}: accuracy {doc['test_accuracy']:.4f}", file=sys.stderr, flush=True)
    header = (f"# {'run':<16} {'accuracy':>8} {'samples to 0.95':>15} {'s to 0.95':>9} {'wall s':>7} "
              f"{'bytes/step':>10} {'ratio':>6}")
    lines = [f"# digits, {args.ranks} ranks, {' '.join(base)}", header]

    def fmt(x: object, spec: str) -> str:
        return "-" if x is None else format(x, spec)
    for r in rows:
        lines.append(f"  {r['run']:<16} {r['final_accuracy']:>8.4f} {fmt(r['samples_to_target'], 'd'):>15} "
                     f"{fmt(r['seconds_to_target'], '.2f'):>9} {fmt(r['wall_s'], '.1f'):>7} "
                     f"{fmt(r['payload_bytes_per_step'], '.0f'):>10} {fmt(r['compression_ratio'], '.1f'):>6}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        bl.write_atomic(args.out + ".txt", text)
        bl.write_json(args.out + ".json", {"meta": {"benchmark": "compression_digits", "ranks": args.ranks,
                                                    "train_args": base, "machine": bl.machine()},
                                           "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
