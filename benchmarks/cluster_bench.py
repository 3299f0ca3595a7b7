"""All-reduce across emulated hosts against the link's limit (needs root: ringsync-cluster).

    sudo python benchmarks/cluster_bench.py --shapes 2x2 --rates 1gbit --launches 3 --calls 20 \
        --out benchmarks/results/cluster/2026-12-07_mpich

For each link rate and shape (hosts x ranks per host) it builds the hosts (docs/cluster.md),
then launches allreduce_sweep.py across them `--launches` times: ringsync's default path
(hierarchical across hosts), the flat ring over point-to-point (ring.py's teaching ring, the
same job) and MPI's own Allreduce, interleaved call by call, `--calls` single timed calls each
per size. Then link_bytes.py counts the bytes of one call on each host link. It prints, per size:

  time       median over every call of every launch, and the spread of the launches' medians
  algbw      bytes / time; busbw = algbw x 2(p-1)/p (nccl-tests)
  floor      the link's limit: 2(h-1)/h x n bytes over each host link at rate/8 bytes/s
  of_link    floor / time: the fraction of the link reached (meaningful where the link, not
             the CPU, is the limit: at 1 Gbit/s here)
  vs_mpi     ringsync's time / MPI's, the median of the launches' ratios (calls interleaved);
             for "ringsync (model)" (--model), marked *: its time / ringsync's with the
             thresholds, in the launch just before, the median of those ratios

and writes <out>.json, <out>.txt and <out>.png (busbw against size, one line per
implementation and shape, the link rate drawn in). The MPI is this Python's (its venv's wheel).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib as bl

from ringsync import cli as ringsync_cli
from ringsync.cluster import Cluster, ClusterError, ClusterSpec, launch

IMPL_NAMES = {"ringsync": "ringsync", "teaching": "flat ring (p2p)", "mpi": "mpi"}


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog="cluster_bench.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x2", help="hosts x ranks per host, comma-separated (2x2)")
    ap.add_argument("--rates", default="1gbit", help="link rates: 1gbit, 10gbit, none (1gbit)")
    ap.add_argument("-b", "--minbytes", type=bl.parse_size, default=bl.parse_size("4K"))
    ap.add_argument("-e", "--maxbytes", type=bl.parse_size, default=bl.parse_size("64M"))
    ap.add_argument("-f", "--stepfactor", type=bl.positive_int, default=4)
    ap.add_argument("--launches", type=bl.positive_int, default=3, help="launches per shape and rate (3)")
    ap.add_argument("--calls", type=bl.positive_int, default=20, help="timed calls per size and implementation per launch (20)")
    ap.add_argument("--out", required=True, help="path prefix of the .json, .txt and .png")
    ap.add_argument("--model", help="a calibration file (ringsync-model fit): also ringsync with "
                    "RINGSYNC_MODEL set, in launches of its own between the others")
    args = ap.parse_args(argv)
    try:
        args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
            raise ValueError
    except ValueError:
        bl.fail(f"cluster_bench.py: error: --shapes: not a list of HOSTSxRANKS: {args.shapes!r}")
    try:
        args.rates = [ringsync_cli.parse_rate(r) for r in args.rates.split(",")]
    except argparse.ArgumentTypeError as exc:
        bl.fail(f"cluster_bench.py: error: --rates: {exc}")
    bl.check_plot_possible(args.out + ".png")
    return args


def sweep(cluster: Cluster, args, folder: Path, tag: str, model: str | None = None) -> dict:
    """One launch of allreduce_sweep.py across the cluster; its JSON document. With `model`
    (a calibration file): ringsync's algorithms picked by the model (RINGSYNC_MODEL), kept
    alone, as "ringsync (model)"."""
    out = folder / f"{tag}.json"
    argv = [str(HERE / "allreduce_sweep.py"), "-b", str(args.minbytes), "-e", str(args.maxbytes),
            "-f", str(args.stepfactor), "-n", "1", "-r", str(args.calls), "-w", "2", "-c", "1",
            "--impls", "ringsync,teaching,mpi", "--json", str(out)]
    env = {"RINGSYNC_MODEL": model} if model else None
    done = launch.run(cluster, [sys.executable, *argv], env=env, timeout=1800)
    if done.returncode != 0:
        raise ClusterError(f"allreduce_sweep.py across {tag} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    doc = json.loads(out.read_text())
    if model:       # (the same three calls interleaved as in the others; only ringsync's kept)
        doc["results"] = [dict(r, impl="ringsync (model)") for r in doc["results"] if r["impl"] == "ringsync"]
    return doc


def link_bytes(cluster: Cluster, args, folder: Path, tag: str) -> list[dict]:
    sizes = [s for s in (1 << 20, 16 << 20) if args.minbytes <= s <= args.maxbytes]
    if not sizes:
        return []
    out = folder / f"{tag}-bytes.json"
    done = launch.run(cluster, [sys.executable, str(HERE / "link_bytes.py"), "--sizes",
                                ",".join(map(str, sizes)), "--json", str(out)], timeout=600)
    if done.returncode != 0:
        raise ClusterError(f"link_bytes.py across {tag} failed: {done.stderr.strip()[-500:]}")
    return json.loads(out.read_text())["rows"]


def summarize(launches: list[dict], hosts: int, rate: int | None) -> list[dict]:
    """One row per (size, implementation) over every launch's calls."""
    rows = []
    by_key: dict[tuple[int, str], list[dict]] = {}
    for doc in launches:
        for r in doc["results"]:
            by_key.setdefault((r["size"], r["impl"]), []).append(r)
    for (size, impl), found in sorted(by_key.items()):
        calls = [t for r in found for t in r["rounds_us"]]
        medians = [statistics.median(r["rounds_us"]) for r in found]
        t = statistics.median(calls) * 1e-6
        # vs MPI in the same launch; the model's choice vs the thresholds' in the launch before
        peer = "ringsync" if impl == "ringsync (model)" else "mpi"
        ratios = [statistics.median(r["rounds_us"]) / statistics.median(m["rounds_us"])
                  for r, m in zip(found, by_key.get((size, peer), []))]
        floor = 2 * (hosts - 1) / hosts * size / (rate / 8) if rate and hosts > 1 else None
        p = found[0]["ranks"]
        rows.append({"size": size, "impl": IMPL_NAMES.get(impl, impl), "calls": len(calls),
                     "launches": len(found), "time_us": t * 1e6,
                     "launch_medians_us": [round(m, 1) for m in medians],
                     "spread_us": [min(medians), max(medians)],
                     "algbw_GBps": size / t / 1e9, "busbw_GBps": size / t / 1e9 * bl.busbw_factor(p),
                     "floor_us": floor * 1e6 if floor else None,
                     "of_link": floor / t if floor else None,
                     "vs_mpi": statistics.median(ratios) if peer == "mpi" and impl != "mpi" and ratios else None,
                     "vs_thresholds": statistics.median(ratios) if peer == "ringsync" and ratios else None})
    return rows


def table(config: dict) -> str:
    rate = config["rate_bps"]
    lines = [(f"## {config['hosts']} hosts x {config['ranks_per_host']} ranks, "
              f"{'%g Gbit/s' % (rate / 1e9) if rate else 'unshaped'} links ({config['mpi']}), "
              f"tbf burst {config['burst_bytes']} B, queue {config['latency_ms']} ms, mtu {config['mtu']}"),
             (f"# {'size':>10} {'impl':>16} {'time(us)':>10} {'spread of launch medians':>26} "
              f"{'algbw':>7} {'busbw':>7} {'floor(us)':>10} {'of_link':>7} {'vs_mpi':>6}")]
    for r in config["rows"]:
        floor = f"{r['floor_us']:>10.0f}" if r["floor_us"] else f"{'-':>10}"
        of = f"{r['of_link']:>7.3f}" if r["of_link"] else f"{'-':>7}"
        vs = f"{r['vs_mpi']:>6.3f}" if r["vs_mpi"] else \
            f"{r['vs_thresholds']:>6.3f}*" if r.get("vs_thresholds") else f"{'-':>6}"
        spread = f"{r['spread_us'][0]:.0f}..{r['spread_us'][1]:.0f}"
        lines.append(f"  {r['size']:>10} {r['impl']:>16} {r['time_us']:>10.0f} {spread:>26} "
                     f"{r['algbw_GBps']:>7.3f} {r['busbw_GBps']:>7.3f} {floor} {of} {vs}")
    for b in config["link_bytes"]:
        ratios = " ".join(f"{s / b['expected']:.3f}/{x / b['expected']:.3f}"
                          for s, x in zip(b["sent"], b["received"]))
        lines.append(f"# bytes per host link, one call of {bl.human(b['size'])} by {b['impl']}: "
                     f"expected {b['expected']:.0f} each way; measured sent/received x expected: {ratios}")
    return "\n".join(lines)


def draw(ax, configs: list[dict]) -> None:
    styles = {"ringsync": "-", "ringsync (model)": "-.", "flat ring (p2p)": ":", "mpi": "--"}
    for c in configs:
        for impl, style in styles.items():
            rows = [r for r in c["rows"] if r["impl"] == impl]
            ax.plot([r["size"] for r in rows], [r["busbw_GBps"] for r in rows], style, marker="o",
                    markersize=3, label=f"{impl} {c['hosts']}x{c['ranks_per_host']} "
                    f"{'%gG' % (c['rate_bps'] / 1e9) if c['rate_bps'] else 'unshaped'}")
    for c in configs:
        if not c["rate_bps"] or c["hosts"] < 2:
            continue
        # The busbw of an all-reduce that runs at the links' floor: algbw = rate/8 divided by
        # the 2(h-1)/h share each link carries, times busbw's 2(p-1)/p for p ranks.
        h, p = c["hosts"], c["hosts"] * c["ranks_per_host"]
        limit = c["rate_bps"] / 8 / 1e9 * h / (2 * (h - 1)) * bl.busbw_factor(p)
        ax.axhline(limit, color="grey", linewidth=0.8)
        ax.text(c["rows"][0]["size"], limit * 1.03, f"link limit, {h}x{c['ranks_per_host']} at "
                f"{c['rate_bps'] / 1e9:g} Gbit/s", fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per all-reduce")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"all-reduce across emulated hosts ({configs[0]['mpi']})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bl.cluster_jobs("cluster_bench.py", "ringsync-cluster-bench-") as (mpi, folder):
        configs = measure(args, mpi, folder)
    text = "\n\n".join(table(c) for c in configs) + "\n"
    bl.write_atomic(args.out + ".txt", f"# {' '.join(['cluster_bench.py', *(argv or sys.argv[1:])])}\n" + text)
    bl.write_json(args.out + ".json", {"benchmark": "cluster_bench", "configs": configs})
    bl.save_plot(args.out + ".png", lambda ax: draw(ax, configs))
    return 0


def measure(args, mpi: str, folder: Path) -> list[dict]:
    """Every rate and shape: hosts up, the launches, the link bytes, hosts down."""
    configs = []
    for rate in args.rates:
        for hosts, per_host in args.shapes:
            with Cluster.up(ClusterSpec([per_host] * hosts, rate_bps=rate)) as cluster:
                tag = f"{hosts}x{per_host}-{rate or 'unshaped'}"
                launches = []
                for i in range(args.launches):      # (with a model: its launches interleaved)
                    launches.append(sweep(cluster, args, folder, f"{tag}-{i}"))
                    if args.model:
                        launches.append(sweep(cluster, args, folder, f"{tag}-{i}-model", args.model))
                config = {"mpi": mpi, "hosts": hosts, "ranks_per_host": per_host, "rate_bps": rate,
                          "burst_bytes": cluster.spec.burst_bytes, "latency_ms": cluster.spec.latency_ms,
                          "mtu": cluster.spec.mtu, "machine": launches[0]["meta"]["machine"],
                          "rows": summarize(launches, hosts, rate),
                          "link_bytes": link_bytes(cluster, args, folder, tag)}
            configs.append(config)
            print(table(config), flush=True)
    return configs


if __name__ == "__main__":
    sys.exit(main())
