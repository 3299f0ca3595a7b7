"""ringsync-model: fit the cost model to measurements, check it, and ask it about other clusters.

    ringsync-model fit FILE... --out calibration.json        the benchmarks' JSON in
    ringsync-model check --calibration CAL FILE...           predicted against measured
    ringsync-model predict --ranks-per-host 8 --rate 10gbit --sizes 4K,64M --p 64,1024,4096
    ringsync-model train --p 2,64,4096 --sync bsp,backup:0.05 --jitter exp:0.005

No MPI: it runs anywhere. Every mistake exits 2 with one line (ringsync/cli.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from ..cli import OneLineParser, fail, float_at_least, int_at_least, parse_size
from ..config import Settings
from ..files import atomic_write, atomic_write_text
from . import algorithms as alg
from . import simulate
from .fit import fit, read, residuals
from .inputs import PROG, algorithm_name, calibration_of, list_of, p_count, rate, write_or_fail
from .params import Calibration, Topology


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    f = sub.add_parser("fit", help="fit alpha, beta and gamma per link class to benchmark JSON")
    f.add_argument("files", nargs="+", help="JSON of make cluster-bench or benchmarks/allreduce_sweep.py")
    f.add_argument("--out", required=True, help="the calibration file to write")
    f.add_argument("--min-bytes", type=parse_size, default=1, help="fit only sizes from this up (default all)")
    f.add_argument("--rate", type=rate, default=None,
                   help="fit only the links of this rate (with the one-host files): a calibration for RINGSYNC_MODEL")

    c = sub.add_parser("check", help="the calibration's predictions against measurements it did not see")
    c.add_argument("files", nargs="+")
    c.add_argument("--calibration", required=True)
    c.add_argument("--min-bytes", type=parse_size, default=parse_size("1M"),
                   help="judge sizes from max(this, 4 x the shaper's burst) up, on several hosts (1M)")
    c.add_argument("--tolerance", type=float_at_least(0.0), default=0.25, help="the error judged acceptable (0.25)")
    c.add_argument("--json", action="store_true", help="one JSON object instead of the table")

    p = sub.add_parser("predict", help="predicted time and busbw per algorithm, size and p")
    p.add_argument("--ranks-per-host", type=int_at_least(1), required=True)
    p.add_argument("--rate", type=rate, default=None, help="each host's link: 1gbit, 25gbit, ... (or the calibration's)")
    p.add_argument("--calibration", help="a file from `fit` (default: the defaults in ringsync/model/params.py)")
    p.add_argument("--sizes", type=list_of(parse_size), default=[parse_size(s) for s in ("4K", "64K", "1M", "16M", "64M")])
    p.add_argument("--p", type=list_of(p_count), default=[8, 64, 512, 4096])
    p.add_argument("--algorithms", type=list_of(algorithm_name), default=["auto", *alg.ALGORITHMS])
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--out", help="also write PREFIX.txt, PREFIX.json and PREFIX.png")

    simulate.add_parser(sub)        # train: steps at scale, with jitter and the sync modes
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fit":
        return cmd_fit(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "train":
        return simulate.main(args)
    return cmd_predict(args)


def _observations(files: list[str]) -> list:
    out = []
    for path in files:
        try:
            out += read(path)
        except ValueError as exc:
            fail(PROG, str(exc))
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    try:
        cal = fit(_observations(args.files), args.min_bytes, args.rate)
    except ValueError as exc:
        fail(PROG, str(exc))
    write_or_fail(args.out, cal.save)
    print(f"# {cal.source}")
    print(f"gamma        {cal.gamma * 1e9:9.4f} ns/byte reduced")
    print(f"shm.sync     {cal.shm_sync * 1e6:9.3f} us per sync point     shm.copy   {cal.shm_copy * 1e9:8.4f} ns/byte")
    print(f"local.alpha  {cal.local_alpha * 1e6:9.3f} us per message      local.beta {cal.local_beta * 1e9:8.4f} ns/byte")
    for r, (a, b) in sorted(cal.nets.items()):
        label = f"{r / 1e9:g} Gbit/s" if r else "unshaped"
        print(f"net.alpha    {a * 1e6:9.3f} us per message      net.beta   {b * 1e9:8.4f} ns/byte   ({label}: "
              f"{8 / b / 1e9 if b else math.inf:.3f} Gbit/s of payload)")
    print(f"# fitted: {', '.join(cal.fitted)}; the others are the defaults")
    if cal.held_at_zero:
        print(f"# held at 0 by the non-negative fit (the data would have them negative): {', '.join(cal.held_at_zero)}")
    print_residuals(cal.residuals)
    print(f"# wrote {args.out}")
    return 0


def print_residuals(rows: list[dict]) -> None:
    print(f"# {'file':<40} {'shape':>6} {'rate':>7} {'impl':>9} {'size':>10} {'measured(us)':>13} "
          f"{'predicted(us)':>14} {'error':>7}")
    for r in rows:
        rate_text = f"{r['rate_bps'] / 1e9:g}G" if r["rate_bps"] else "-"
        print(f"  {r['source'][:40]:<40} {r['shape']:>6} {rate_text:>7} {r['impl']:>9} {r['size']:>10} "
              f"{r['measured_s'] * 1e6:13.1f} {r['predicted_s'] * 1e6:14.1f} {r['error']:+7.1%}")


def cmd_check(args: argparse.Namespace) -> int:
    cal = calibration_of(args.calibration)
    observations = _observations(args.files)
    rows = [r._asdict() for r in residuals(observations, cal)]
    judged = [r for r, o in zip(rows, observations)
              if o.topology.hosts > 1 and o.size >= max(args.min_bytes, 4 * o.burst)]
    one_host = [r for r, o in zip(rows, observations) if o.topology.hosts == 1]
    worst = max(judged, key=lambda r: abs(r["error"]), default=None)
    summary = {"calibration": args.calibration, "judged": len(judged),
               "within": sum(abs(r["error"]) <= args.tolerance for r in judged), "tolerance": args.tolerance,
               "worst": worst, "one_host_worst": max(one_host, key=lambda r: abs(r["error"]), default=None),
               "rows": rows}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print_residuals(rows)
    print(f"# judged (several hosts, sizes >= max({args.min_bytes}, 4 x burst)): {summary['within']} of "
          f"{len(judged)} within ±{args.tolerance:.0%}")
    for label, r in (("worst judged", worst), ("worst on one host (reported, not judged)", summary["one_host_worst"])):
        if r:
            print(f"# {label}: {r['shape']} {r['impl']} {r['size']} bytes: {r['error']:+.1%} ({r['source']})")
    return 0


def predictions(args: argparse.Namespace, cal: Calibration) -> list[dict]:
    out = []
    settings = Settings()
    for p in args.p:
        top = Topology.uniform(p, min(args.ranks_per_host, p), args.rate)
        for n in args.sizes:
            for name in args.algorithms:
                if name == "auto":
                    choice = alg.ringsync_choice(n, top, settings)
                    terms = alg.ringsync_terms(n, top, settings, algorithm=choice)
                elif name == "shared" and top.hosts > 1 and min(top.ranks_per_host) == 1 == max(top.ranks_per_host):
                    continue            # (one rank per host: no shared memory to use)
                elif name == "gathered":        # (on one host, ringsync's rides in shared memory)
                    choice, terms = None, alg.gathered(n, top, shm=top.hosts == 1)
                else:
                    choice, terms = None, alg.ALGORITHMS[name](n, top)
                t = alg.seconds(terms, cal, args.rate)
                if math.isnan(t):
                    fail(PROG, f"--rate: the calibration has no link of {args.rate} bit/s and cannot "
                               f"derive one; give --rate")
                row = {"algorithm": name, "size_bytes": n, "p": p, "hosts": top.hosts, "seconds": t,
                       "busbw": (n / t) * 2 * (p - 1) / p / 1e9 if t > 0 else None}
                if choice:
                    row["choice"] = choice
                out.append(row)
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    cal = calibration_of(args.calibration)
    if args.rate is None and args.calibration:
        shaped = [r for r in cal.nets if r]
        args.rate = shaped[0] if len(shaped) == 1 else None
    if args.rate is None and max(args.p) > args.ranks_per_host:
        fail(PROG, "--rate: needed when p spans several hosts (e.g. --rate 10gbit)")
    rows = predictions(args, cal)
    best = {}
    for r in rows:
        key = (r["size_bytes"], r["p"])
        if r["algorithm"] != "auto" and (key not in best or r["seconds"] < best[key]["seconds"]):
            best[key] = r
    result = {"ranks_per_host": args.ranks_per_host, "rate_bps": args.rate, "calibration": cal.source,
              "predictions": rows,
              "best": [{"size_bytes": n, "p": p, "algorithm": b["algorithm"]} for (n, p), b in best.items()]}
    text = table(result, best)
    if args.out:
        write_or_fail(f"{args.out}.json", lambda path: atomic_write_text(path, json.dumps(result, indent=1) + "\n"))
        write_or_fail(f"{args.out}.txt", lambda path: atomic_write_text(path, text))
        write_or_fail(f"{args.out}.png", lambda path: plot(result, path))
    print(json.dumps(result, indent=1) if args.json else text, end="" if not args.json else "\n")
    return 0


def table(result: dict, best: dict) -> str:
    link = f"link {result['rate_bps'] / 1e9:g} Gbit/s" if result["rate_bps"] else "one host"
    lines = [f"# {PROG} predict: {result['ranks_per_host']} ranks per host, {link}; {result['calibration']}",
             f"# {'size':>10} {'p':>5} {'hosts':>5} {'algorithm':>12} {'time(us)':>12} {'busbw(GB/s)':>11}  best?"]
    for r in result["predictions"]:
        name = r["algorithm"] + (f"={r['choice']}" if "choice" in r else "")
        mark = "  *" if best.get((r["size_bytes"], r["p"])) is r else ""
        lines.append(f"  {r['size_bytes']:>10} {r['p']:>5} {r['hosts']:>5} {name:>12} {r['seconds'] * 1e6:12.1f} "
                     f"{r['busbw'] or 0:11.3f}{mark}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ps = sorted({r["p"] for r in result["predictions"]})
    fig, axes = plt.subplots(1, len(ps), figsize=(4.5 * len(ps), 4), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], ps):
        for name in dict.fromkeys(r["algorithm"] for r in result["predictions"]):
            rows = [r for r in result["predictions"] if r["p"] == p and r["algorithm"] == name]
            if rows:
                ax.plot([r["size_bytes"] for r in rows], [r["busbw"] for r in rows], marker="o",
                        label=name, linestyle="--" if name == "auto" else "-")
        ax.set_xscale("log", base=2)
        ax.set_title(f"p = {p} ({rows[0]['hosts'] if rows else '?'} hosts)")
        ax.set_xlabel("bytes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("predicted busbw (GB/s)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)

if __name__ == "__main__":
    sys.exit(main())
