"""Summarise relay_bench.sh lines: medians per relay and config, and ratios to Postfix."""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def main() -> None:
    runs: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for line in sys.stdin:
        if not line.startswith("relay="):
            continue
        fields = dict(part.split("=", 1) for part in line.split())
        config = f"conc={fields['conc']} size={fields['size']}"
        runs[(config, fields["relay"])].append(fields)
    configs = sorted(
        {c for c, _ in runs}, key=lambda c: (int(c.split()[1][5:]), int(c.split()[0][5:]))
    )
    print("\nsummary (medians)")
    head = ("config", "relay", "e2e msg/s", "x postfix", "PSS MiB", "x postfix", "lost")
    print("{:<24}{:<14}{:>10}{:>10}{:>9}{:>10}{:>6}".format(*head))
    for config in configs:
        base = runs.get((config, "postfix"))
        base_rate = statistics.median(float(r["e2e_msgs_per_s"]) for r in base) if base else None
        base_pss = statistics.median(float(r["pss_peak_kb"]) for r in base) if base else None
        for (c, relay), rs in sorted(runs.items()):
            if c != config:
                continue
            rate = statistics.median(float(r["e2e_msgs_per_s"]) for r in rs)
            pss = statistics.median(float(r["pss_peak_kb"]) for r in rs)
            lost = sum(int(r["lost"]) for r in rs)
            rr = f"{rate / base_rate:.2f}" if base_rate else "-"
            pr = f"{pss / base_pss:.2f}" if base_pss else "-"
            print(
                f"{config:<24}{relay:<14}{rate:>10.0f}{rr:>10}{pss / 1024:>9.1f}{pr:>10}{lost:>6}"
            )


if __name__ == "__main__":
    main()
