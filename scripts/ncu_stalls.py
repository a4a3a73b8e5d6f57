"""Where a kernel's warps wait, per SASS instruction: the warp-stall samples of an ncu report's source page.

    ncu --clock-control none --set full --import-source no -k regex:attention_fwd_fp8 --launch-skip 1 -c 1 -o fp8 \
        python3 scripts/profile_forward.py 128 4096 0 fp8
    ncu -i fp8.ncu-rep --page source --csv --print-source sass > fp8-sass.csv
    python3 scripts/ncu_stalls.py fp8-sass.csv [--top 30]

Prints the stall reasons over the whole kernel, then the instructions holding the most samples, the samples per
opcode, then each wgmma wait (WARPGROUP.DEPBAR) with its samples and the MUFU.EX2 that follow it before the next
wait (whether a wait sits ahead of or behind the softmax's exponentials; session 12 found ptxas had put it ahead).
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=30, help="instructions to list")
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        table = list(csv.reader(f))
    header = next(row for row in table if "Address" in row and "Source" in row)
    rows = table[table.index(header) + 1:]
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def samples(row: list[str], name: str = "Warp Stall Sampling (All Samples)") -> int:
        value = row[col[name]].replace(",", "")
        return int(value) if value else 0

    total = sum(samples(r) for r in rows)
    by_reason = Counter({reason: sum(samples(r, reason) for r in rows) for reason in reasons})
    print(f"{total} samples over {len(rows)} instructions")
    for reason, n in by_reason.most_common(10):
        print(f"  {reason[6:]:18s} {n / total:6.1%}")
    print(f"\ntop {args.top} instructions (index: share, SASS, stall reasons)")
    for i in sorted(range(len(rows)), key=lambda i: -samples(rows[i]))[: args.top]:
        detail = " ".join(f"{r[6:]}={rows[i][col[r]]}" for r in reasons if rows[i][col[r]] not in ("", "0"))
        print(f"  {i:5d}: {samples(rows[i]) / total:5.1%}  {rows[i][col['Source']].strip()[:60]:60s} {detail}")
    print("\nsamples per opcode (share of all samples, instructions)")
    per_opcode: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for row in rows:
        words = [w for w in row[col["Source"]].split() if not w.startswith("@")]
        if words:
            opcode = words[0].split(".")[0]
            per_opcode[opcode] += samples(row)
            count[opcode] += 1
    for opcode, n in per_opcode.most_common(12):
        print(f"  {opcode:12s} {n / total:6.1%}  ({count[opcode]})")
    print("\nwgmma waits and exponentials in program order (index: share, SASS)")
    mufu = [i for i, r in enumerate(rows) if "MUFU.EX2" in r[col["Source"]]]
    waits = [i for i, r in enumerate(rows) if "WARPGROUP.DEPBAR" in r[col["Source"]]]
    for i, after in zip(waits, waits[1:] + [len(rows)]):
        between = sum(1 for m in mufu if i < m < after)
        print(f"  {i:5d}: {samples(rows[i]) / total:5.1%}  {rows[i][col['Source']].strip()}  "
              f"({between} MUFU.EX2 between it and the next wait)")


if __name__ == "__main__":
    main()
