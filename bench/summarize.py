"""Summarise relay_bench.sh lines: per relay and config the median and spread (min–max) of
end-to-end msg/s, CPU seconds per 1000 messages and peak PSS, and the ratios to Postfix.

Runs on this shared machine vary by ±25 %: relay_bench.sh interleaves the relays, and every
figure here is a median of the repeats with its spread beside it."""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict


def _spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


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
    print("\nsummary (median of the repeats, spread min-max)")
    head = (
        "config",
        "relay",
        "n",
        "e2e msg/s",
        "spread",
        "x pf",
        "cpu s/1k",
        "x pf",
        "PSS MiB",
        "x pf",
        "lost",
    )
    fmt = "{:<23}{:<16}{:>3}{:>10}{:>11}{:>6}{:>9}{:>6}{:>8}{:>6}{:>5}"
    print(fmt.format(*head))
    for config in configs:
        base = runs.get((config, "postfix"))

        def med(rs: list[dict[str, str]], key: str) -> float:
            return statistics.median(float(r[key]) for r in rs)

        def cpu_per_k(rs: list[dict[str, str]]) -> float:
            return statistics.median(
                1000 * float(r["cpu_s"]) / max(1, int(r["n"]) - int(r["lost"])) for r in rs
            )

        b_rate = med(base, "e2e_msgs_per_s") if base else None
        b_cpu = cpu_per_k(base) if base else None
        b_pss = med(base, "pss_peak_kb") if base else None
        for (c, relay), rs in sorted(runs.items()):
            if c != config:
                continue
            rate = med(rs, "e2e_msgs_per_s")
            cpu = cpu_per_k(rs)
            pss = med(rs, "pss_peak_kb")
            lost = sum(int(r["lost"]) for r in rs)
            print(
                fmt.format(
                    config,
                    relay,
                    len(rs),
                    f"{rate:.0f}",
                    _spread([float(r["e2e_msgs_per_s"]) for r in rs]),
                    f"{rate / b_rate:.2f}" if b_rate else "-",
                    f"{cpu:.2f}",
                    f"{cpu / b_cpu:.2f}" if b_cpu else "-",
                    f"{pss / 1024:.1f}",
                    f"{pss / b_pss:.2f}" if b_pss else "-",
                    lost,
                )
            )


if __name__ == "__main__":
    main()
