"""Quick check of tensor fusion: many small all-reduces vs one fused call vs one big buffer.

    mpiexec -n 2 python benchmarks/fusion_quick.py            # 256 arrays of 16 KB (4 MB in all)
    mpiexec -n 2 python benchmarks/fusion_quick.py --count 256 --kb 16 --reps 15 --json out.json

Four ways to all-reduce the same 4 MB, interleaved round by round so a busy machine slows
them alike; each time is the slowest rank's, and the table shows medians:
  one-by-one       256 calls of rs.allreduce_ (each pays the ring's 2(p-1) latencies)
  grouped (copy)   rs.grouped_allreduce_ on 256 separate arrays: pack, one ring, unpack
  grouped (views)  rs.grouped_allreduce_ on 256 views of one FlatBuffer: no copy at all
  one 4 MB         a single rs.allreduce_ of one 4 MB array: the floor fusion aims for
"""
import argparse
import json
import statistics
import time

import numpy as np

import ringsync as rs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256, help="number of arrays (256)")
    parser.add_argument("--kb", type=float, default=16, help="size of each array in KB (16)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds (15)")
    parser.add_argument("--json", help="write the medians to this JSON file (rank 0)")
    args = parser.parse_args()
    if args.count < 1 or args.kb <= 0 or args.reps < 1:
        parser.error("--count, --kb and --reps must be positive")

    rs.init()
    n = int(args.kb * 1024) // 4                        # float32 elements per array
    rng = np.random.default_rng(rs.rank())
    separate = [rng.standard_normal(n).astype(np.float32) for _ in range(args.count)]
    flat = rs.FlatBuffer([(n,)] * args.count, np.float32)
    flat.flat[...] = rng.standard_normal(flat.flat.size)
    big = rng.standard_normal(n * args.count).astype(np.float32)

    cases = {
        "one-by-one": lambda: [rs.allreduce_(a) for a in separate],
        "grouped (copy)": lambda: rs.grouped_allreduce_(separate),
        "grouped (views)": lambda: rs.grouped_allreduce_(flat.views),
        f"one {big.nbytes / 2**20:.0f} MB": lambda: rs.allreduce_(big),
    }
    times = {name: [] for name in cases}
    for case in cases.values():                         # warm-up: buffers allocated, pages touched
        case()
    for _ in range(args.reps):
        for name, case in cases.items():
            rs.barrier()
            t = time.perf_counter()
            case()
            elapsed = np.array([time.perf_counter() - t])
            times[name].append(float(rs.allreduce(elapsed, op=rs.Max)[0]))   # the slowest rank
    med = {name: statistics.median(ts) for name, ts in times.items()}
    if rs.rank() == 0:
        one_by_one, floor = med["one-by-one"], list(med.values())[-1]
        print(f"{rs.size()} ranks, {args.count} x {args.kb:g} KB float32, median of {args.reps} "
              f"interleaved rounds (slowest rank)")
        print(f"{'case':<18}{'time (ms)':>12}{'vs one-by-one':>16}{'vs one buffer':>16}")
        for name, t in med.items():
            print(f"{name:<18}{1e3 * t:>12.3f}{one_by_one / t:>15.1f}x{t / floor:>15.2f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": rs.size(), "count": args.count, "kb": args.kb,
                           "reps": args.reps, "median_seconds": med}, f, indent=2)


if __name__ == "__main__":
    main()
