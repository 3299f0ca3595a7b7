"""The α–β–γ model (ringsync/model) on Horovod's published GPU benchmark: predicted scaling efficiency.

    python benchmarks/model_horovod.py [--out PREFIX]      # PREFIX.txt and PREFIX.json as well

Every input, with its source (docs/scaling.md, "Inputs", has the full URLs) or "assumption":

  cluster  4 Pascal GPUs per server, 25 Gbit/s RoCE-capable network, up to 128 servers (512 GPUs)
           [Horovod docs/benchmarks.rst; README at commit 02290f9: 32 servers, 128 GPUs]
  published  512 GPUs: 90% Inception V3 and ResNet-101, 68% VGG-16 [docs/benchmarks.rst];
           128 GPUs: 90%, 90%, 79% [README 02290f9]; 128 GPUs, TCP: 88% for Inception V3 and
           ResNet-101, RDMA 3-4% better, above 90% [arXiv 1802.05799 sec. 8, as summarised]
  params   ResNet-101 44,549,160 [torchvision resnet.py]; Inception V3 23,851,784 (no auxiliary
           head, as tf_cnn_benchmarks builds it) and VGG-16 138,357,544 [Keras applications table];
           fp32: 4 bytes of gradient per parameter
  compute  batch 64 per GPU [Horovod docs' ResNet-101 command; ASSUMPTION for the other two, as in
           TensorFlow's P100 table]; one P100 (DGX-1, synthetic data): Inception V3 142, VGG-16 154,
           ResNet-50 219, ResNet-152 91.8 images/s [TensorFlow docs_src/performance/benchmarks.md];
           ResNet-101 = 129 images/s, ASSUMPTION: per-image time interpolated between ResNet-50 and
           -152 by FLOPs (3.8, 7.6, 11.3 GFLOPs, He et al. 2015); ASSUMPTION: Uber's Pascal GPUs run
           as fast as a DGX-1 P100
  fusion   Horovod's 64 MB fusion buffer [docs/tensor-fusion.rst]; ASSUMPTION: gradients fused
           into ceil(bytes / 64 MiB) equal all-reduces per step (the fewest possible)
  overlap  ASSUMPTION: backward = 2/3 of the step. Bounds: "lo" = no overlap (step = compute +
           all-reduces); "hi" = everything but the last all-reduce hidden under the backward pass
           (exposed = max(last all-reduce, all - backward))
  links    ASSUMPTIONS (NETS below): net α 10 µs per ring step over RDMA (NCCL's tuner, tuning.cc:
           9.6 µs NET Ring/Simple), 30 µs over TCP; net β = wire bytes x 8 / 25e9 with 1.02 (RoCEv2,
           4096-byte MTU) or 1538/1448 (TCP) wire bytes per byte; within a server PCIe 3 at 10 GB/s,
           5.7 µs per step (tuning.cc PCI Ring/Simple) for "local" and ringsync's "shm" classes;
           γ = 4 ps/byte (HBM2: 3 bytes of memory traffic per byte reduced at ~730 GB/s)

Algorithms: ring (flat, one step per GPU), shared (ringsync's hierarchical, 1 MiB slot pieces, each
piece its own ring across servers), shared/1 (the same with the whole all-reduce as one piece).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ringsync.files import atomic_write_text
from ringsync.model.algorithms import ring, seconds, shared
from ringsync.model.params import Calibration, Topology

RATE = 25 * 10**9
PER_SERVER = 4
BATCH = 64
FUSION = 64 << 20
BACKWARD = 2 / 3
GPUS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODELS = {  # name: (parameters, images/s on one GPU)
    "ResNet-101": (44_549_160, 1 / (1 / 219 + (7.6 - 3.8) / (11.3 - 3.8) * (1 / 91.8 - 1 / 219))),
    "Inception V3": (23_851_784, 142.0),
    "VGG-16": (138_357_544, 154.0),
}
PUBLISHED = {  # (model, GPUs): [(percent, what, source)]
    ("ResNet-101", 128): [(88, "TCP", "paper"), (90, "RoCE-capable", "README 02290f9")],
    ("Inception V3", 128): [(88, "TCP", "paper"), (90, "RoCE-capable", "README 02290f9")],
    ("VGG-16", 128): [(79, "RoCE-capable", "README 02290f9")],
    ("ResNet-101", 512): [(90, "RoCE-capable", "docs/benchmarks.rst")],
    ("Inception V3", 512): [(90, "RoCE-capable", "docs/benchmarks.rst")],
    ("VGG-16", 512): [(68, "RoCE-capable", "docs/benchmarks.rst")],
}


def gpu_cal(alpha: float, wire: float, name: str) -> Calibration:
    return Calibration(gamma=4e-12, shm_sync=5.7e-6, shm_copy=1e-10, local_alpha=5.7e-6, local_beta=1e-10,
                       nets={RATE: (alpha, wire * 8 / RATE)}, source=f"assumptions: {name} (model_horovod.py)")


NETS = {"RDMA": gpu_cal(10e-6, 1.02, "RoCE RDMA"), "TCP": gpu_cal(30e-6, 1538 / 1448, "TCP")}
ALGOS = {"ring": ring, "shared": shared, "shared/1": lambda n, top: shared(n, top, slot_bytes=math.ceil(n))}


def allreduces(n_bytes: float, p: int, algo: str, cal: Calibration) -> tuple[float, float]:
    """(all of a step's all-reduces, the last one) in seconds."""
    calls = math.ceil(n_bytes / FUSION)
    one = seconds(ALGOS[algo](n_bytes / calls, Topology.uniform(p, PER_SERVER, RATE)), cal, RATE)
    return calls * one, one


def predict() -> list[dict]:
    rows = []
    for model, (params, rate1) in MODELS.items():
        compute = BATCH / rate1
        for net, cal in NETS.items():
            for algo in ALGOS:
                for p in GPUS:
                    total, last = allreduces(4.0 * params, p, algo, cal)
                    exposed_hi = max(last, total - BACKWARD * compute) if p > 1 else 0.0
                    rows.append({"model": model, "net": net, "algo": algo, "gpus": p, "compute_s": compute,
                                 "allreduce_s": total, "eff_lo": compute / (compute + total),
                                 "eff_hi": compute / (compute + exposed_hi)})
    return rows


def pct(r: dict) -> str:
    return f"{100 * r['eff_lo']:3.0f}-{100 * r['eff_hi']:3.0f}%"


def render(rows: list[dict]) -> str:
    find = {(r["model"], r["net"], r["algo"], r["gpus"]): r for r in rows}
    cols = [(net, algo) for net in NETS for algo in ALGOS]
    out = [("Predicted scaling efficiency, lo-hi = no overlap .. all but the last all-reduce hidden "
            f"(25 Gbit/s, {PER_SERVER} GPUs per server, batch {BATCH} per GPU, fp32 gradients)"), ""]
    for model, (params, rate1) in MODELS.items():
        calls = math.ceil(4 * params / FUSION)
        out.append(f"{model}: {4 * params / 1e6:.1f} MB of gradients in {calls} all-reduce(s), "
                   f"{rate1:.0f} images/s on one GPU -> compute {BATCH / rate1 * 1e3:.0f} ms per step")
        out.append(f"{'GPUs':>5} {'servers':>7} {'ring ms':>8} " + " ".join(f"{n + ' ' + a:>16}" for n, a in cols))
        for p in GPUS:
            ms = find[(model, "RDMA", "ring", p)]["allreduce_s"] * 1e3
            cells = " ".join(f"{pct(find[(model, n, a, p)]):>16}" for n, a in cols)
            out.append(f"{p:5d} {math.ceil(p / PER_SERVER):7d} {ms:8.1f} {cells}")
        out.append("")
    out.append("Against the published figures (ring; the model's TCP row for TCP, its RDMA row for RoCE-capable)")
    out.append(f"{'model':<13} {'GPUs':>5}  {'published':<40} {'predicted lo-hi':>16}")
    for (model, p), figures in PUBLISHED.items():
        for percent, net, source in figures:
            r = find[(model, "TCP" if net == "TCP" else "RDMA", "ring", p)]
            out.append(f"{model:<13} {p:5d}  {f'{percent}% ({net}, {source})':<40} {pct(r):>16}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="model_horovod.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", metavar="PREFIX", help="also write PREFIX.txt and PREFIX.json")
    args = ap.parse_args(argv)
    rows = predict()
    text = render(rows)
    sys.stdout.write(text)
    if args.out:
        atomic_write_text(args.out + ".txt", text)
        data = {"inputs": {"rate_bps": RATE, "gpus_per_server": PER_SERVER, "batch": BATCH, "fusion_bytes": FUSION,
                           "backward_fraction": BACKWARD,
                           "models": {m: {"parameters": n, "images_per_s_1gpu": r} for m, (n, r) in MODELS.items()},
                           "calibrations": {k: c.to_json() for k, c in NETS.items()}},
                "published": [{"model": m, "gpus": p, "percent": pc, "net": net, "source": s}
                              for (m, p), figs in PUBLISHED.items() for pc, net, s in figs],
                "rows": rows}
        atomic_write_text(args.out + ".json", json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
