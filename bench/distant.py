"""Relaying to a distant, TLS-only provider (issue "Performance round 2", goal 3): pyrelay, Postfix.

Real deployments relay to SendGrid or SES over the internet, 20-80 ms away, always with STARTTLS.
Here Postfix's ``smtp-source`` sends ``-n`` messages (default 2000) of 5000 bytes from
``--clients`` (20) concurrent sessions, one message per session, to a fresh relay, which relays
them to a fresh ``bench/sink.py`` on 127.0.0.1 (it advertises PIPELINING, 8BITMIME and SIZE,
answers a pipelined group in one write, counts the messages and stamps the last one).  The same
sink serves both relays, so its cost is shared alike.  The relays' listeners are plain SMTP; the
configs differ on the upstream side:

- ``rtt``: the sink is behind ``bench/latency_proxy.py``, which writes every chunk
  ``--delay-ms`` (10) ms after it arrived, both ways, in order, without a bandwidth limit: a
  20 ms round trip (and a new connection's greeting comes two round trips after connect, as
  after a TCP handshake).  Plain SMTP upstream.
- ``starttls``: the sink offers STARTTLS with an RSA-2048 certificate for ``localhost`` and
  127.0.0.1 signed by a private CA made here with ``trustme``, and both relays require and
  verify it: pyrelay with ``RELAYHOST=[localhost]:PORT``, ``RELAYHOST_TLS_LEVEL=secure`` (its
  default) and ``RELAYHOST_TLS_CA_FILE``; Postfix with ``relayhost = [localhost]:PORT``,
  ``smtp_host_lookup = native`` (``/etc/hosts``), ``smtp_tls_security_level = secure`` and
  ``smtp_tls_CAfile``.  Postfix keeps its defaults otherwise: no reuse of TLS connections
  (``smtp_tls_connection_reuse = no``: one handshake per message) and no TLS session cache.
- ``rtt+starttls``: both.

Upstream concurrency: Postfix ``default_destination_concurrency_limit`` and
``smtp_destination_concurrency_limit``, and pyrelay ``PYRELAY_CONCURRENCY``, are all set to
``--upstream-concurrency`` (20, both products' default).  pyrelay's limit is per worker process
and ``PYRELAY_WORKERS`` stays at its default (``auto``: 2 on 2+ cores), so pyrelay may open up to
twice as many upstream connections; ``upstream_conns_peak`` (the most the sink had open at once)
shows what each relay did (``--pyrelay-env PYRELAY_CONCURRENCY=10`` or ``PYRELAY_WORKERS=1``
caps it at 20 in all).  Everything else is the product default (``ALLOWED_SENDER_DOMAINS`` = the
sender's domain).  ``--pyrelay-env NAME=VALUE`` and ``--postfix-setting NAME=VALUE`` (main.cf;
``tlsproxy`` is enabled for ``smtp_tls_connection_reuse=yes``) change one relay's settings;
``--wrong-ca`` makes both relays trust another CA instead: every message must then be deferred
(``lost=n`` after ``--e2e-timeout``; the relay's log tail shows why).

Runs are interleaved (for each repeat, each config, each relay) and each prints one line:

- ``e2e_msgs_per_s``: messages the sink received / time from starting ``smtp-source`` until the
  last of them arrived (the sink's own time stamp); ``nan`` when some never arrived within
  ``--e2e-timeout`` (``lost`` = n - received);
- ``accept_msgs_per_s``: n / time until ``smtp-source`` exited;
- ``cpu_s_per_1000``: user+system CPU of the relay's whole process tree (reaped children
  included) from the start until the sink had everything, per 1000 messages received;
- ``pss_peak_mb``: peak PSS of the relay's process tree (``/proc/PID/smaps_rollup``, every
  0.2 s); ``procs`` the most processes in it;
- ``upstream_conns`` / ``upstream_conns_peak`` / ``tls_handshakes``: connections the sink
  accepted, the most open at once, completed STARTTLS handshakes; ``sink_cpu_s`` /
  ``proxy_cpu_s``: CPU the sink and the proxy used meanwhile (they share the machine's cores).

Then per config and relay the median [min-max] over repeats, and the pyrelay/Postfix ratio of
e2e msg/s computed within each repeat (paired), summarised the same way.

    python bench/distant.py                          # 2000 messages, 5 repeats, all configs
    python bench/distant.py -n 200 -r 1              # smoke run
    python bench/distant.py --configs rtt --delay-ms 40
    python bench/distant.py --configs rtt+starttls --postfix-setting smtp_tls_connection_reuse=yes
    python bench/distant.py --configs starttls --wrong-ca -n 20 -r 1 --e2e-timeout 15

Needs Debian's ``postfix`` package (``smtp-source`` and ``postfix``), root for the private Postfix
instance, and ``trustme`` (a test dependency).  Every wait is bounded; relays, sinks, the proxy
and temp dirs are removed on any exit (also on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchlib import MB, RCPT, SENDER, Sampler, Sink, cpu_of, free_port, ready_port, stop_process
from tls_cost import (
    LIVE,
    Postfix,
    PyRelay,
    Stoppable,
    common_options,
    guarded,
    need_postfix,
    parse_configs,
    run_failed,
    say,
    sbin,
    signals_held,
    spread,
    wait_delivered,
)

CONFIGS = ("rtt", "starttls", "rtt+starttls")
RELAYS = ("pyrelay", "postfix")
BENCH = Path(__file__).resolve().parent
SIZE = 5000


# -- helper processes --------------------------------------------------------------------------


class Helper:
    """A helper process, stopped (and forgotten by ``LIVE``) by ``stop()``."""

    proc: subprocess.Popen[bytes]

    def start(self, cmd: list[str], stdout: int | IO[bytes], stderr: int) -> None:
        with signals_held():
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
            LIVE.append(self)

    def stop(self) -> None:
        stop_process(self.proc)
        forget(self)


class Proxy(Helper):
    """``bench/latency_proxy.py`` in front of ``upstream_port``."""

    def __init__(self, upstream_port: int, delay_ms: float) -> None:
        cmd = [sys.executable, str(BENCH / "latency_proxy.py"), "--upstream-port"]
        self.start(
            [*cmd, str(upstream_port), "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.port = ready_port(self.proc, "bench/latency_proxy.py")
        except RuntimeError:
            self.stop()
            raise


class Source(Helper):
    """Postfix's ``smtp-source``: ``clients`` sessions, one message per session."""

    def __init__(self, port: int, n: int, clients: int, out: Path) -> None:
        binary = sbin("smtp-source")
        if binary is None:
            raise RuntimeError("smtp-source not found (Debian's postfix package)")
        cmd = [binary, "-s", str(clients), "-l", str(SIZE), "-m", str(n)]
        cmd += ["-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
        self.out = out
        with out.open("wb") as f:
            self.start(cmd, stdout=f, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.out.read_text(errors="replace").splitlines()[-5:])
        return ""


def forget(thing: Stoppable) -> None:
    with contextlib.suppress(ValueError):
        LIVE.remove(thing)


@dataclass(frozen=True)
class Certs:
    sink: Path  # the sink's key and certificate chain
    ca: Path  # the CA that signed it
    wrong_ca: Path  # another CA

    @classmethod
    def make(cls, directory: Path) -> Certs:
        import trustme

        directory.mkdir(mode=0o755)
        ca, wrong = trustme.CA(key_type=trustme.KeyType.RSA), trustme.CA()
        certs = cls(directory / "sink.pem", directory / "ca.pem", directory / "wrong-ca.pem")
        leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        leaf.private_key_and_cert_chain_pem.write_to_path(str(certs.sink))
        ca.cert_pem.write_to_path(str(certs.ca))
        wrong.cert_pem.write_to_path(str(certs.wrong_ca))
        for path in (certs.ca, certs.wrong_ca):
            path.chmod(0o644)  # Postfix's smtp runs as the postfix user
        return certs


# -- one run -----------------------------------------------------------------------------------


def start_relay(
    args: argparse.Namespace, name: str, run_dir: Path, port: int, upstream: int, tls: Path | None
) -> PyRelay | Postfix:
    """``name`` listening on ``port``, relaying to 127.0.0.1:``upstream`` (as ``localhost`` with
    STARTTLS required and verified against the CA file ``tls``)."""
    host = "[localhost]" if tls else "[127.0.0.1]"
    limit = str(args.upstream_concurrency)
    if name == "pyrelay":
        env = {"RELAYHOST": f"{host}:{upstream}", "PYRELAY_CONCURRENCY": limit}
        if tls:
            env.update(RELAYHOST_TLS_LEVEL="secure", RELAYHOST_TLS_CA_FILE=str(tls))
        env.update(args.pyrelay_env)
        return PyRelay(run_dir, port, upstream, False, **env)
    settings = {
        "relayhost": f"{host}:{upstream}",
        "default_destination_concurrency_limit": limit,
        "smtp_destination_concurrency_limit": limit,
    }
    if tls:
        settings.update(
            smtp_host_lookup="native",
            smtp_tls_security_level="secure",
            smtp_tls_CAfile=str(tls),
        )
    settings.update(args.postfix_setting)
    # tlsproxy (commented out in Debian's master.cf) serves only smtp_tls_connection_reuse = yes
    return Postfix(run_dir, port, upstream, None, settings, services=("tlsproxy",))


def run_one(
    args: argparse.Namespace, rep: int, config: str, name: str, work: Path, certs: Certs
) -> dict[str, float] | None:
    parts = config.split("+")
    tls, rtt = "starttls" in parts, "rtt" in parts
    run_dir = Path(tempfile.mkdtemp(prefix=f"{config}.{name}.", dir=work))
    run_dir.chmod(0o755)
    tag = f"config={config} relay={name}"
    sink: Sink | None = None
    proxy: Proxy | None = None
    relay: PyRelay | Postfix | None = None
    source: Source | None = None
    sampler: Sampler | None = None
    try:
        with signals_held():
            sink = Sink(run_dir, tls_cert=certs.sink if tls else None)
            LIVE.append(sink)
        upstream = sink.port
        if rtt:
            proxy = Proxy(sink.port, args.delay_ms)
            upstream = proxy.port
        ca = (certs.wrong_ca if args.wrong_ca else certs.ca) if tls else None
        port = free_port()
        relay = start_relay(args, name, run_dir, port, upstream, ca)
        relay.wait_listening(args.start_timeout)
        tree = relay.tree
        assert tree is not None
        sampler = Sampler(root=tree.root, interval=0.2).start()
        helpers = [sink.proc.pid] + ([proxy.proc.pid] if proxy else [])
        cpu0, helpers0 = tree.cpu(), [cpu_of([pid]) for pid in helpers]
        t0 = time.monotonic()
        source = Source(port, args.n, args.clients, run_dir / "smtp-source.out")
        rc = source.wait(args.timeout)
        t1 = time.monotonic()
        wait_delivered(sink.received, args.n, relay, t1 + args.e2e_timeout)
        cpu1, helpers1 = tree.cpu(), [cpu_of([pid]) for pid in helpers]
        peaks = sampler.stop()
        sink_cpu, *proxy_cpu = (b - a for a, b in zip(helpers0, helpers1, strict=True))
        stats = sink.stats()
        received = int(stats["messages"])
        complete = received >= args.n
        e2e_s = stats["last_at"] - t0
        row = {
            "e2e": received / e2e_s if complete and e2e_s > 0 else float("nan"),
            "accept": args.n / (t1 - t0),
            "cpu1000": (cpu1 - cpu0) * 1000 / max(1, received),
            "pss": peaks.pss / MB,
        }
        say(
            f"{tag} n={args.n} e2e_msgs_per_s={row['e2e']:.1f} "
            f"accept_msgs_per_s={row['accept']:.1f} cpu_s_per_1000={row['cpu1000']:.2f} "
            f"pss_peak_mb={row['pss']:.1f} lost={args.n - received} run={rep}/{args.repeats} "
            f"send_s={t1 - t0:.2f} e2e_s={e2e_s if received else float('nan'):.2f} "
            f"procs={peaks.processes} upstream_conns={stats['connections']:.0f} "
            f"upstream_conns_peak={stats['connections_peak']:.0f} "
            f"tls_handshakes={stats['tls']:.0f} sink_cpu_s={sink_cpu:.2f} "
            f"proxy_cpu_s={f'{proxy_cpu[0]:.2f}' if proxy_cpu else '-'}"
        )
        if rc != 0:
            say(f"  smtp-source {'timed out' if rc is None else f'exit {rc}'}:\n{source.tail()}")
        if not complete or not relay.alive():
            alive = "alive" if relay.alive() else "DEAD"
            tail = "\n".join(relay.diagnostics().splitlines()[-8:])
            say(f"  relay {alive}; log tail:\n{tail}")
        return row
    except Exception as exc:  # one failed run must not lose the others
        run_failed(f"{tag} run={rep}/{args.repeats}", exc, relay)
        return None
    finally:
        if sampler is not None:
            sampler.stop()
        for thing in (source, relay, proxy, sink):
            if thing is not None:
                thing.stop()
                forget(thing)
        shutil.rmtree(run_dir, ignore_errors=True)


# -- summary -----------------------------------------------------------------------------------


def summarize(
    results: dict[tuple[str, str], list[dict[str, float] | None]], configs: list[str]
) -> None:
    say("summary: median [min-max] over repeats")
    for config in configs:
        for name in RELAYS:
            rows = [r for r in results[config, name] if r is not None]
            say(
                f"  config={config} relay={name} runs={len(rows)}"
                f" e2e_msgs_per_s={spread([r['e2e'] for r in rows])}"
                f" accept_msgs_per_s={spread([r['accept'] for r in rows])}"
                f" cpu_s_per_1000={spread([r['cpu1000'] for r in rows], '.2f')}"
                f" pss_peak_mb={spread([r['pss'] for r in rows])}"
            )
        ratios = []
        for ours, theirs in zip(
            results[config, "pyrelay"], results[config, "postfix"], strict=True
        ):
            if ours is not None and theirs is not None and theirs["e2e"] > 0:
                ratios.append(ours["e2e"] / theirs["e2e"])  # NaN (incomplete) is dropped
        say(f"  config={config} pyrelay/postfix e2e (paired): {spread(ratios, '.2f')}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("-n", type=int, default=2000, help="messages per run")
    ap.add_argument("-r", "--repeats", type=int, default=5, help="interleaved repeats")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of configs")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay of rtt configs")
    ap.add_argument("--clients", type=int, default=20, help="smtp-source sessions (-s)")
    ap.add_argument(
        "--upstream-concurrency", type=int, default=20, help="deliveries to the upstream at once"
    )
    for option, what in (
        ("--pyrelay-env", "environment variable"),
        ("--postfix-setting", "main.cf parameter"),
    ):
        ap.add_argument(
            option,
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"one more {what} for this relay (repeatable)",
        )
    ap.add_argument("--wrong-ca", action="store_true", help="relays trust another CA: all defer")
    ap.add_argument("--timeout", type=float, default=600, help="smtp-source limit per run (s)")
    common_options(ap)
    args = ap.parse_args()
    for option in ("pyrelay_env", "postfix_setting"):
        pairs = [item.partition("=") for item in getattr(args, option)]
        if any(not name or not eq for name, eq, _ in pairs):
            ap.error(f"--{option.replace('_', '-')} wants NAME=VALUE")
        setattr(args, option, {name.strip(): value.strip() for name, _, value in pairs})
    configs = parse_configs(ap, args.configs, CONFIGS)
    if sbin("smtp-source") is None:
        ap.error("smtp-source not found: install Debian's postfix package")
    need_postfix(ap, "the Postfix baseline and its private instance")

    def body(work: Path) -> int:
        results: dict[tuple[str, str], list[dict[str, float] | None]] = {
            (c, r): [] for c in configs for r in RELAYS
        }
        certs = Certs.make(work / "certs")
        say(
            f"distant: n={args.n} clients={args.clients} size={SIZE} repeats={args.repeats} "
            f"configs={','.join(configs)} delay_ms={args.delay_ms:g} "
            f"upstream_concurrency={args.upstream_concurrency} wrong_ca={args.wrong_ca} "
            f"pyrelay_env={args.pyrelay_env or '-'} postfix_settings={args.postfix_setting or '-'} "
            f"python={sys.version.split()[0]} openssl={ssl.OPENSSL_VERSION.split()[1]} "
            f"cpus={os.cpu_count()} load1={os.getloadavg()[0]:.2f}"
        )
        for rep in range(1, args.repeats + 1):
            for config in configs:
                for name in RELAYS:
                    results[config, name].append(run_one(args, rep, config, name, work, certs))
        summarize(results, configs)
        failed = sum(r is None for rows in results.values() for r in rows)
        return 1 if failed else 0

    return guarded("distant.", args.workdir, body)


if __name__ == "__main__":
    sys.exit(main())
