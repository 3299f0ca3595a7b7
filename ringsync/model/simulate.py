"""Training steps at scale (`ringsync-model train`): what waiting for the slowest costs.

A step on p ranks is compute + waiting + communication. Each rank computes for `compute`
seconds plus a delay drawn per rank and step (--jitter): exponential of mean m, lognormal,
or a persistent straggler (the first k ranks always DELAY late). Communication is the α–β–γ
model's time for one all-reduce of --grad-bytes (ringsync_terms: what ringsync would run, its
opening included), not overlapped with compute; --grad-bytes 0 leaves the waiting alone.
Monte Carlo over (steps x p) arrays of delays, seeded (--seed; every mode at one p sees the
same draws). Per mode:

    bsp        a step waits for the slowest rank:  max_r (c + d_r) + allreduce
    backup:B   it waits for the (p-B)-th rank; the B late ranks abandon their work, which is
               lost (p-B gradients count). B: a count, or a fraction of p (the nearest count)
    local:H    each rank steps alone; every H steps the parameters are all-reduced, after
               the slowest rank's H steps:  max_r sum_h (c + d_rh) + allreduce, per H steps
    async      p workers and one parameter server (an extra host). A worker computes, pushes
               its gradient, pulls the parameters: 2(alpha + beta x bytes) on its own link. The
               server's link (--ps-rate) is full duplex, as in algorithms.py, so it carries
               one push in and one pull out per (alpha + beta x bytes): that caps the updates/s
               whatever p is, and workers wait for it (mean field: each slowed in proportion)

Efficiency = useful samples/s / (p / compute): the share of p ranks' ideal rate (no delay, no
communication) that becomes gradients in an update, a rank's batch per step being one unit
(backup uses (p-B)/p of them; async every update). "lost" = a unit's time beyond compute and
communication (waiting and delay; async: mean delay + waiting for the server). "theory" is
what lost must be: m·H_p for bsp and m(H_p - H_B) for backup under exponential jitter
(H_k = 1 + 1/2 + ... + 1/k: the mean of the (p-B)-th of p draws), DELAY or 0 for a straggler.
Async's staleness (updates between a worker's read and its write) is p - 1 on average (each
other worker updates about once per cycle; the slowest worker's mean is the max), not priced
in accuracy. `rank_wait_s` is the lab's "wait": mean over ranks of own finish to the step's.
The lab check sets the model beside `make sync-lab`'s measured 4-rank figures
(benchmarks/results/sync_vs_async.json; docs/sync-vs-async.md).
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cli import fail, int_at_least, parse_size
from ..files import atomic_write_text
from . import algorithms as alg
from .inputs import calibration_of, list_of, p_count, rate, write_or_fail
from .params import Topology

PROG = "ringsync-model train"
BLOCK = 1 << 21                     # delays drawn per block (16 MiB of float64)
LAB = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "sync_vs_async.json"
LAB_STEPS = 200_000


def harmonic(k: int) -> float:
    return float(np.sum(1.0 / np.arange(1, k + 1))) if k > 0 else 0.0


def analytic_wait(p: int, m: float, b: int = 0) -> float:
    """Mean of the (p-b)-th smallest of p exponential draws of mean m: m(H_p - H_b); bsp: m·H_p."""
    return m * (harmonic(p) - harmonic(b))


def count_of(text: str, p: int) -> int:
    """'3' -> 3; '0.05' -> the nearest whole number to 0.05 x p."""
    return math.floor(float(text) * p + 0.5) if "." in text else int(text)


@dataclass(frozen=True)
class Jitter:
    kind: str = "none"              # none | exp | lognormal | straggler
    mean: float = 0.0               # exp, lognormal: the mean delay; straggler: its delay
    sigma: float = 0.0              # lognormal: sigma of the underlying normal
    ranks: str = "1"                # straggler: how many ranks (a count, or a fraction of p)

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        if self.kind == "exp":
            return rng.exponential(self.mean, shape)
        if self.kind == "lognormal":
            return rng.lognormal(math.log(self.mean) - self.sigma ** 2 / 2, self.sigma, shape)
        out = np.zeros(shape)
        if self.kind == "straggler":
            out[:, :self.stragglers(shape[1])] = self.mean
        return out

    def stragglers(self, p: int) -> int:
        return min(p, max(1, count_of(self.ranks, p)))


def parse_jitter(text: str) -> Jitter:
    kind, *rest = text.strip().lower().split(":")
    want = {"none": (0, 0), "exp": (1, 1), "lognormal": (2, 2), "straggler": (1, 2)}
    try:
        if kind not in want or not want[kind][0] <= len(rest) <= want[kind][1]:
            raise ValueError
        nums = [float(x) for x in rest[:2 if kind == "lognormal" else 1]]
        if not all(math.isfinite(x) and x >= 0 for x in nums) or (kind in ("exp", "lognormal") and nums[0] <= 0):
            raise ValueError
        ranks = rest[1] if kind == "straggler" and len(rest) > 1 else "1"
        if kind == "straggler" and not (0 < float(ranks) and ("." in ranks) == (float(ranks) < 1)):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a jitter: {text!r} (exp:MEAN, lognormal:MEAN:SIGMA, straggler:DELAY[:RANKS], none)") from None
    return Jitter(kind, *(nums + [0.0, 0.0])[:2], ranks=ranks)


def parse_sync(text: str) -> list[tuple[str, str]]:
    """'bsp,backup:0.05,local:8,async' -> [('bsp', ''), ('backup', '0.05'), ...]."""
    modes = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        name, _, arg = item.partition(":")
        ok = {"bsp": arg == "", "async": arg == "", "local": arg.isdigit() and int(arg) >= 1,
              "backup": arg.isdigit() or (arg.startswith("0.") and arg[2:].isdigit())}
        if not ok.get(name):
            raise argparse.ArgumentTypeError(f"not a sync mode: {item!r} (bsp, backup:B, local:H, async;"
                                             f" B a count or a fraction < 1 of p, H >= 1)")
        modes.append((name, arg))
    if not modes:
        raise argparse.ArgumentTypeError(f"an empty list: {text!r}")
    return modes


def _blocks(jitter: Jitter, rng: np.random.Generator, steps: int, p: int, group: int = 1):
    rows = max(group, BLOCK // p // group * group)
    for start in range(0, steps, rows):
        yield jitter.draw(rng, (min(rows, steps - start), p))


def simulate_mode(mode: str, arg: str, p: int, compute: float, jitter: Jitter, comm_s: float,
                  steps: int, seed: int = 0, ps_s: float = 0.0) -> dict:
    """One mode at p ranks, `steps` steps (async: updates per worker). comm_s: one all-reduce
    (async: a worker's push and pull); ps_s: the server link's time per update (0: no bound)."""
    rng = np.random.default_rng([seed, p])
    row = {"mode": f"{mode}:{arg}" if arg else mode, "p": p, "theory_s": None}
    if mode == "async":
        busy = np.zeros(p)
        for d in _blocks(jitter, rng, steps, p):
            busy += d.sum(0)
        cycle = compute + comm_s + busy / steps           # each worker's mean time per update
        free = float(np.sum(1 / cycle))                   # updates/s if the server were infinitely fast
        rate = min(free, 1 / ps_s) if ps_s > 0 else free
        unit = p / rate
        return row | {"comm_s": comm_s, "lost_s": unit - compute - comm_s, "unit_s": unit, "useful": 1.0,
                      "efficiency": rate * compute / p, "rank_wait_s": unit - float(cycle.mean()),
                      "ps_bound": rate < free, "staleness_mean": p - 1.0,
                      "staleness_max": free * float(cycle.max()) - 1}
    h = int(arg) if mode == "local" else 1
    b = count_of(arg, p) if mode == "backup" else 0
    total = waits = n = 0
    for d in _blocks(jitter, rng, -(-steps // h) * h, p, h):
        if h > 1:
            d = d.reshape(-1, h, p).sum(1)
        t = np.partition(d, p - b - 1, axis=1)[:, p - b - 1] if b else d.max(1)
        total += float(t.sum())
        waits += float(np.maximum(t[:, None] - d, 0).mean(1).sum())
        n += len(t)
    lost, comm, useful = total / n / h, comm_s / h, (p - b) / p
    if jitter.kind == "exp" and mode in ("bsp", "backup"):
        row["theory_s"] = analytic_wait(p, jitter.mean, b)
    elif jitter.kind in ("none", "straggler"):
        row["theory_s"] = jitter.mean if jitter.kind == "straggler" and b < jitter.stragglers(p) else 0.0
    return row | {"B": b, "H": h, "comm_s": comm, "lost_s": lost, "unit_s": compute + lost + comm,
                  "useful": useful, "efficiency": useful * compute / (compute + lost + comm),
                  "rank_wait_s": waits / n / h}


def lab_check(path: Path | None, seed: int = 0) -> list[dict]:
    """The model at p = 4 beside the lab's measured figures (ms); [] without the file."""
    try:
        lab = json.loads(Path(path).read_text()) if path else None
        added = {r["mode"]: r["added_ms"] for r in lab["jitter_step_time"]}
        measured = {(r["scenario"], r["mode"]): r for r in lab["results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    exp, slow = Jitter("exp", 0.005), Jitter("straggler", 0.02)

    def sim(mode, arg, jitter, key, p=4):
        return simulate_mode(mode, arg, p, 0.001, jitter, 0.0, LAB_STEPS, seed)[key]
    x = np.random.default_rng(seed).exponential(5.0, (LAB_STEPS, 4))   # ms
    rank0 = float(np.maximum(x[:, 0], np.sort(x, 1)[:, 2]).mean())    # rank 0 aggregates and computes
    rows = [("bsp, jitter: added per step", 1e3 * sim("bsp", "", exp, "lost_s"), "m·H_4", added.get("bsp")),
            ("backup:1, jitter: added per step", 1e3 * sim("backup", "1", exp, "lost_s"), "m(H_4-H_1)",
             added.get("backup:1")),
            ("backup:1, jitter, rank 0 aggregating: max(X_0, 3rd of 4)", rank0, None, added.get("backup:1"))]
    for scenario, jitter in (("jitter", exp), ("straggler", slow)):
        for mode, arg in (("bsp", ""), ("local", "4")):
            label = f"{mode}{':' + arg if arg else ''}"
            rows.append((f"{label}, {scenario}: wait per rank and step", 1e3 * sim(mode, arg, jitter, "rank_wait_s"),
                         None, measured.get((scenario, label), {}).get("wait_ms_per_unit")))
        rows.append((f"async, {scenario}: mean staleness, 3 workers",
                     sim("async", "", jitter, "staleness_mean", 3), None,
                     measured.get((scenario, "async"), {}).get("staleness_mean")))
    theory = {"m·H_4": analytic_wait(4, 5.0), "m(H_4-H_1)": analytic_wait(4, 5.0, 1)}
    return [{"what": w, "simulated": s, "formula": f, "formula_value": theory.get(f), "measured": m,
             "ratio": m / s if m and s else None} for w, s, f, m in rows if m is not None]


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="simulated training steps at scale: efficiency against p per sync mode")
    t.add_argument("--p", type=list_of(p_count), default=[2, 16, 128, 1024, 4096], help="ranks (<= 4096)")
    t.add_argument("--compute", type=positive, default=0.1, help="seconds of compute per step (0.1)")
    t.add_argument("--jitter", type=parse_jitter, default=parse_jitter("exp:0.005"),
                   help="exp:MEAN | lognormal:MEAN:SIGMA | straggler:DELAY[:RANKS] | none (exp:0.005)")
    t.add_argument("--sync", type=parse_sync, default=parse_sync("bsp,backup:0.05,local:8,async"))
    t.add_argument("--grad-bytes", type=lambda s: 0 if s.strip() == "0" else parse_size(s), default=25 << 20,
                   help="gradient bytes all-reduced per step (25M = 25 MiB, 6.5M float32; 0: no communication)")
    t.add_argument("--ranks-per-host", type=int_at_least(1), default=8)
    t.add_argument("--rate", type=rate, default=False,
                   help="each host's link (default: the calibration's one fitted rate, else 10gbit)")
    t.add_argument("--ps-rate", type=rate, default=False, help="async: the parameter server's link (--rate)")
    t.add_argument("--calibration", help="a file from `fit` (default: ringsync/model/params.py's defaults)")
    t.add_argument("--algorithm", default="auto", choices=["auto", *alg.ALGORITHMS],
                   help="the all-reduce: auto (ringsync's choice, its opening included) or one algorithm")
    t.add_argument("--steps", type=int_at_least(1), default=1000, help="steps simulated per mode and p (1000)")
    t.add_argument("--seed", type=int_at_least(0), default=0)
    t.add_argument("--lab", default=str(LAB), help="the lab's measured figures (sync_vs_async.json; none: skip)")
    t.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    t.add_argument("--out", help="also write PREFIX.txt, PREFIX.json and PREFIX.png")


def main(args: argparse.Namespace) -> int:
    cal = calibration_of(args.calibration)
    shaped = [r for r in cal.nets if r]
    link = args.rate if args.rate is not False else shaped[0] if args.calibration and len(shaped) == 1 else 10**10
    ps_link, n, rows = link if args.ps_rate is False else args.ps_rate, args.grad_bytes, []
    for name, arg in args.sync:
        for p in (p for p in args.p if name == "backup" and count_of(arg, p) >= p):
            fail(PROG, f"--sync backup:{arg}: B must be < p, but it is {count_of(arg, p)} at p = {p}")
    (alpha, beta), (ps_alpha, ps_beta) = [(cal.values(r)["net.alpha"], cal.values(r)["net.beta"]) for r in (link, ps_link)]
    for flag, r, cost in (("--rate", link, alpha + beta), ("--ps-rate", ps_link, ps_alpha + ps_beta)):
        if math.isnan(cost):
            fail(PROG, f"{flag}: the calibration has no {f'{r} bit/s' if r else 'unshaped'} link and cannot derive one")
    for p in args.p:
        top = Topology.uniform(p, min(args.ranks_per_host, p), link)
        terms = alg.ringsync_terms(n, top) if args.algorithm == "auto" else alg.ALGORITHMS[args.algorithm](n, top)
        comm = alg.seconds(terms, cal, link)
        worker, server = (2 * (alpha + beta * n), ps_alpha + ps_beta * n) if n else (0.0, 0.0)
        rows += [simulate_mode(name, arg, p, args.compute, args.jitter, worker if name == "async" else comm,
                               args.steps, args.seed, server) | {"hosts": top.hosts} for name, arg in args.sync]
    result = {"compute_s": args.compute, "jitter": asdict(args.jitter), "grad_bytes": n, "rate_bps": link,
              "ps_rate_bps": ps_link, "ranks_per_host": args.ranks_per_host, "algorithm": args.algorithm,
              "calibration": cal.source, "steps": args.steps, "seed": args.seed, "rows": rows,
              "lab_check": lab_check(None if args.lab == "none" else Path(args.lab), args.seed)}
    text = table(result)
    if args.out:
        write_or_fail(f"{args.out}.json", lambda path: atomic_write_text(path, json.dumps(result, indent=1) + "\n"))
        write_or_fail(f"{args.out}.txt", lambda path: atomic_write_text(path, text))
        write_or_fail(f"{args.out}.png", lambda path: plot(rows, path, text.splitlines()[0]))
    print(json.dumps(result, indent=1) if args.json else text, end="\n" if args.json else "")
    return 0


def table(result: dict) -> str:
    j, ms = result["jitter"], lambda x: "-" if x is None else f"{x * 1e3:.2f}"
    gbit = [f"{r / 1e9:g} Gbit/s" if r else "unshaped" for r in (result["rate_bps"], result["ps_rate_bps"])]
    jit = ":".join([j["kind"]] + [f"{v:g}" for v in (j["mean"], j["sigma"]) if v] + [j["ranks"]] * (j["kind"] == "straggler"))
    head = (f"# {PROG}: compute {result['compute_s'] * 1e3:g} ms/step, jitter {jit}, {result['grad_bytes']} gradient "
            f"bytes, {result['ranks_per_host']} ranks/host, link {gbit[0]} (server {gbit[1]}), "
            f"{result['algorithm']}; {result['steps']} steps, seed {result['seed']}; "
            f"{result['calibration']}")
    lines = [head, f"# {'mode':>12} {'p':>5} {'hosts':>5} {'comm ms':>9} {'lost ms':>8} {'theory':>8} {'unit ms':>9} "
             + f"{'useful':>6} {'efficiency':>10}  notes"]
    for r in result["rows"]:
        note = f"B={r['B']}" if r["mode"].startswith("backup") else ""
        if "staleness_mean" in r:
            note = f"staleness {r['staleness_mean']:.0f} (max {r['staleness_max']:.1f})" + ", server-bound" * r["ps_bound"]
        lines.append(f"  {r['mode']:>12} {r['p']:>5} {r['hosts']:>5} {ms(r['comm_s']):>9} {ms(r['lost_s']):>8} "
                     f"{ms(r['theory_s']):>8} {ms(r['unit_s']):>9} {r['useful']:6.3f} {r['efficiency']:10.1%}  {note}")
    if result["lab_check"]:
        lines.append("# the lab, 4 ranks (benchmarks/results/sync_vs_async.json): simulated | formula | measured")
    for c in result["lab_check"]:
        formula = f"{c['formula']} = {c['formula_value']:.2f}" if c["formula"] else "-"
        lines.append(f"#   {c['what']:<58} {c['simulated']:7.2f} | {formula:>18} | {c['measured']:7.2f} "
                     f"({c['ratio']:.2f}x)")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        ax.plot([r["p"] for r in mine], [r["efficiency"] for r in mine], marker="o", label=mode)
    ax.set(xlabel="ranks p", ylabel="scaling efficiency", ylim=(0, 1.05))
    ax.set_xscale("log", base=2)
    ps = sorted({r["p"] for r in rows})
    ax.set_xticks(ps, [str(p) for p in ps])
    ax.set_title(textwrap.fill(title[2:], 120), fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..files import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
