"""Operator commands: ``config`` (Postfix's ``postconf``), ``check-upstream``, ``send-test``,
``health``, and the registration of ``queue`` (queue_commands.py) and ``demo`` (demo.py).

Exit codes: 0 success, 1 failure at run time (an unknown queue ID, a failed check, the relay not
running), 2 usage or configuration error.  Data goes to stdout (``--json`` where a command prints
data), complaints to stderr.

Heavy modules (asyncio, aiosmtplib, the spool) are imported inside the commands that use them:
``pyrelay health`` runs every 30 seconds in the container and should cost little more than
loading the settings.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from pyrelay.cmdutil import Subparsers, add_command, add_json_flag, error, print_json
from pyrelay.config import ENV_NAMES, HostPort, ListenAddress, Settings, load_settings
from pyrelay.constants import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

_QUEUED_AS = re.compile(r"queued as (\S+)")


def register(sub: Subparsers) -> None:
    """Add the operator subcommands to the ``pyrelay`` parser."""
    p = add_command(
        sub,
        "config",
        cmd_config,
        "show the effective configuration (like postconf)",
        "Print the effective configuration, one `NAME = value` line per setting, secrets masked. "
        "NAME may be any accepted variable name or alias (MASQUERADE_DOMAINS, "
        "POSTFIX_smtp_tls_security_level, ...).",
        "2 configuration error or unknown NAME",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="only these settings")
    add_json_flag(p)

    p = add_command(
        sub,
        "check-upstream",
        cmd_check_upstream,
        "connect to RELAYHOST now and report each step",
        "Connect to RELAYHOST as a delivery would (DNS, TCP, greeting, TLS, AUTH) and report "
        "which step fails, in Postfix's words, or list the server's capabilities. "
        "Nothing is sent; the password is never printed.",
        "1 a step failed",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per-step timeout (default 10)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="probe every relay host of PYRELAY_ROUTES_FILE and the fallbacks too",
    )
    add_json_flag(p)

    from pyrelay import dkim_commands, queue_commands

    queue_commands.register(sub)
    dkim_commands.register(sub)

    from pyrelay import user_commands

    user_commands.register(sub)

    from pyrelay import drain

    drain.register(sub)

    p = add_command(
        sub,
        "send-test",
        cmd_send_test,
        "submit a test message through the running listener",
        "Send a short test message to the relay's listener with an ordinary SMTP client (like an "
        "application would) and print the queue ID the relay assigned. Defaults: the first "
        "PYRELAY_LISTEN address, sender postmaster@<first ALLOWED_SENDER_DOMAINS>.",
        "1 the listener refused the message or could not be reached",
    )
    p.add_argument("--to", dest="to", action="append", required=True, metavar="ADDR")
    p.add_argument("--from", dest="sender", metavar="ADDR")
    p.add_argument("--host", metavar="H", help="listener host (default: from PYRELAY_LISTEN)")
    p.add_argument("--port", type=int, metavar="P", help="listener port")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    add_json_flag(p)

    p = add_command(
        sub,
        "health",
        cmd_health,
        "exit 0 if the listener answers SMTP and the spool is writable",
        "For container health checks: greets every PYRELAY_LISTEN address (220, EHLO, QUIT) "
        "and writes, fsyncs and removes a probe file in the spool. Prints one line.",
        "1 unhealthy (the line says why)",
    )
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per check (default 5)")

    add_command(
        sub,
        "demo",
        _run_demo,
        "start a relay and a local upstream, send a message through, show what arrived",
        "A self-contained tour: starts an upstream SMTP server (STARTTLS with a throwaway "
        "certificate, AUTH demo/demo) and a relay in one process, sends a message through it "
        "and prints the delivery log and what the upstream received. Needs no configuration; "
        "ignores the environment.",
        "1 the message was not delivered",
    )


def _text(reply: bytes | str) -> str:
    """smtplib hands replies over as bytes, its exceptions sometimes as str."""
    return reply if isinstance(reply, str) else reply.decode(errors="replace")


def _local(address: HostPort | ListenAddress) -> str:
    """Where a client on this host reaches a listener bound to ``address``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)


# ----------------------------------------------------------------------------------- config


def cmd_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    values = settings.dump()
    # The routes (the default one last) when a routes file is in use.
    routes = _routes(settings) if settings.routes_file and not args.names else None
    if args.names:
        canonical = _canonical_names()
        selected: dict[str, str] = {}
        unknown = []
        for name in args.names:
            key = canonical.get(name.lower())
            if key is not None and key not in values and key.endswith("_FILE"):
                key = key.removesuffix("_FILE")  # the secret it loads is what is in effect
            if key is None or key not in values:
                unknown.append(name)
            else:
                selected[key] = values[key]
        if unknown:
            return error(
                f"config: unknown parameter {', '.join(unknown)} "
                "(run `pyrelay config` to list them all)",
                EXIT_USAGE,
            )
        values = selected
    from pyrelay.smtpd_tls import certificate_info, tls_wanted

    cert = None
    if tls_wanted(settings) and not args.names:
        info, problem = certificate_info(settings)
        cert = (
            {"path": str(info.path), "subject": info.subject, "sha256": info.sha256}
            | {"not_after": f"{info.not_after:%Y-%m-%dT%H:%M:%SZ}"}
            if info is not None
            else {"problem": problem}
        )
    if getattr(args, "json", False):
        extra: dict[str, object] = {}
        if cert is not None:
            extra["listener_certificate"] = cert
        if routes is not None:
            extra["routes"] = routes
        print_json({**values, **extra})
    else:
        for key, value in values.items():
            print(f"{key} = {value}")
        if cert is not None:
            print("# listener certificate: " + ", ".join(f"{k} {v}" for k, v in cert.items()))
        for route in routes or []:
            print(f"\n[route {route['name']}]")
            for key, value in route.items():
                if key != "name":
                    print(f"{key} = {value}")
    return EXIT_OK


def _routes(settings: Settings) -> list[dict[str, str]]:
    """The effective routes, the default last, secrets masked (ConfigError if the file is
    wrong)."""
    from pyrelay.routes import RouteTable

    return [{"name": r.name, **r.dump()} for r in RouteTable(settings).all]


def _canonical_names() -> dict[str, str]:
    """Every accepted variable name (lowercased) -> the name ``Settings.dump`` uses."""
    out: dict[str, str] = {}
    for variables in ENV_NAMES.values():
        out.update((variable.lower(), variables[0]) for variable in variables)
    return out


# --------------------------------------------------------------------------- check-upstream

_HINTS = {
    "dns": "check the host name in RELAYHOST and this host's DNS resolver",
    "tcp": "check RELAYHOST's port, and that outbound connections to it are allowed",
    "greeting": "the server accepted the connection but did not greet; is it an SMTP port?",
    "tls": "a certificate problem: point RELAYHOST_TLS_CA_FILE (or SSL_CERT_FILE) at the CA "
    "that signed it, or see RELAYHOST_TLS_LEVEL in the README",
    "auth": "check RELAYHOST_USERNAME and RELAYHOST_PASSWORD (SendGrid's user name is "
    "literally 'apikey')",
    "token": "the OAuth2 token endpoint refused the refresh: check XOAUTH2_CLIENT_ID, "
    "XOAUTH2_SECRET and XOAUTH2_TOKEN_ENDPOINT; a revoked grant needs a new "
    "XOAUTH2_INITIAL_REFRESH_TOKEN",
}


def cmd_check_upstream(args: argparse.Namespace) -> int:
    import asyncio

    settings = load_settings().replace(
        upstream_connect_timeout=args.timeout, upstream_command_timeout=args.timeout
    )
    if getattr(args, "all", False):
        return _check_all(settings, args)
    if not settings.relayhost.host:
        return error("check-upstream: no RELAYHOST (PYRELAY_DELIVERY=mx); try --all", EXIT_USAGE)
    report = asyncio.run(_probe_upstream(settings, args.timeout))
    if getattr(args, "json", False):
        print_json(report)
    else:
        _print_upstream_report(settings, report)
    return EXIT_OK if report["ok"] else EXIT_FAILURE


def _check_all(settings: Settings, args: argparse.Namespace) -> int:
    """Every route's relay host and fallback, one report each."""
    import asyncio

    from pyrelay.routes import RouteTable

    reports: list[dict[str, Any]] = []
    for route in RouteTable(settings).all:
        for role, target in (("relayhost", route.primary), ("fallback", route.fallback)):
            if target is None:
                continue
            target_settings = target.settings(settings)
            report = asyncio.run(_probe_upstream(target_settings, args.timeout))
            report.update(route=route.name, role=role)
            reports.append(report)
            if not getattr(args, "json", False):
                print(f"== route {route.name} ({role})")
                _print_upstream_report(target_settings, report)
                print()
    if getattr(args, "json", False):
        print_json({"ok": all(r["ok"] for r in reports), "routes": reports})
    ok = all(r["ok"] for r in reports)
    if not getattr(args, "json", False):
        print("OK: every route is ready" if ok else "FAIL: at least one route is not ready")
    return EXIT_OK if ok else EXIT_FAILURE


async def _probe_upstream(settings: Settings, timeout: float) -> dict[str, Any]:
    import asyncio
    import ssl

    import aiosmtplib

    from pyrelay.delivery import Step, Upstream
    from pyrelay.errors import DeliveryError

    order = [str(s) for s in (Step.DNS, Step.TCP, Step.GREETING, Step.TLS, Step.AUTH)]
    if settings.xoauth2:
        order.insert(order.index("auth"), str(Step.TOKEN))
    steps: list[tuple[Step, str]] = []
    report: dict[str, Any] = {
        "ok": False,
        "relayhost": str(settings.relayhost),
        "steps": [],
        "failed_step": None,
        "error": None,
        "hint": None,
        "capabilities": {},
    }

    def fail(step: str, text: str) -> dict[str, Any]:
        report["steps"] = [{"step": str(s), "status": "ok", "detail": d} for s, d in steps]
        report["steps"].append({"step": step, "status": "failed", "detail": text})
        report.update(failed_step=step, error=text, hint=_HINTS.get(step))
        return report

    def next_step() -> str:
        done = {str(s) for s, _ in steps}
        return next((s for s in order if s not in done), "auth")

    try:
        upstream = Upstream(settings)
    except (OSError, ssl.SSLError) as exc:
        return fail("tls", f"cannot load RELAYHOST_TLS_CA_FILE {settings.tls_ca_file}: {exc}")
    try:
        # Each step has its own timeout; this bounds a server that trickles replies.
        session = await asyncio.wait_for(upstream.open(steps=steps), timeout * len(order))
    except DeliveryError as exc:
        return fail(str(exc.kind), exc.text)
    except (TimeoutError, OSError, aiosmtplib.SMTPException) as exc:
        return fail(next_step(), str(exc) or f"timed out after {timeout * len(order):g}s")
    try:
        report["capabilities"] = dict(session.client.esmtp_extensions)
    finally:
        await upstream.close(session)
    report["steps"] = [{"step": str(s), "status": "ok", "detail": d} for s, d in steps]
    done = {str(s) for s, _ in steps}
    if "tls" not in done:
        why = (
            "RELAYHOST_TLS_LEVEL=none"
            if upstream.tls_context is None
            else f"not offered by the server; RELAYHOST_TLS_LEVEL={settings.tls_level} "
            "allows plain text"
        )
        report["steps"].append({"step": "tls", "status": "skipped", "detail": why})
    if "auth" not in done:
        report["steps"].append(
            {"step": "auth", "status": "skipped", "detail": "RELAYHOST_USERNAME is not set"}
        )
    report["ok"] = True
    return report


def _print_upstream_report(settings: Settings, report: dict[str, Any]) -> None:
    mode = "implicit TLS" if settings.implicit_tls else "STARTTLS"
    who = (
        f", AUTH as {settings.relayhost_username.get_secret_value()}"
        if settings.has_credentials
        else ""
    )
    print(
        f"relayhost: {report['relayhost']} ({mode}, RELAYHOST_TLS_LEVEL={settings.tls_level}{who})"
    )
    for step in report["steps"]:
        if step["status"] == "failed":
            print(f"FAIL {step['step']}: {step['detail']}")
        else:
            print(f"{step['step']}: {step['status']} {step['detail']}")
    if not report["ok"]:
        if report.get("hint"):
            print(f"hint: {report['hint']}")
        return
    print(f"OK: {report['relayhost']} is ready to relay mail; it offers:")
    for name, params in report["capabilities"].items():
        print(f"  {name.upper()} {params}".rstrip())


# -------------------------------------------------------------------------------- send-test


def cmd_send_test(args: argparse.Namespace) -> int:
    import smtplib
    import socket
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    host, port, sender = args.host, args.port, args.sender
    implicit_tls = False
    if host is None or port is None or sender is None:
        settings = load_settings()
        listen = settings.listen[0]
        host = host or _local(listen)
        port = port or listen.port
        implicit_tls = listen.tls and port == listen.port
        domains = settings.allowed_sender_domains
        sender = sender or f"postmaster@{domains[0] if domains else settings.hostname}"
    if not port:
        return error("send-test: the listener port is not known; use --port", EXIT_USAGE)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(args.to)
    msg["Subject"] = "pyrelay test message"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("pyrelay-test", domain=sender.rpartition("@")[2] or None)
    msg.set_content(
        f"A test message from `pyrelay send-test` on {socket.gethostname()},\n"
        f"submitted to the relay at {where}.\n"
        "If it reached you, the relay works.\n",
        cte="7bit",  # readable in `pyrelay queue show`, unlike quoted-printable
    )

    def refused(stage: str, code: int, text: bytes | str) -> int:
        reply = f"{code} {_text(text)}"
        if getattr(args, "json", False):
            print_json({"ok": False, "queue_id": None, "stage": stage, "reply": reply})
        else:
            print(f"FAIL: {where} refused the message at {stage}: {reply}")
        return EXIT_FAILURE

    try:
        with _client(host, port, args.timeout, implicit_tls) as smtp:
            smtp.ehlo_or_helo_if_needed()
            if not implicit_tls and smtp.has_extn("starttls"):
                # Like an app with TLS on: opportunistic, the certificate is not checked.
                smtp.starttls(context=_unverified_context())
                smtp.ehlo()
            code, text = smtp.mail(sender)
            if code != 250:
                return refused("MAIL FROM", code, text)
            for rcpt in args.to:
                code, text = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    return refused("RCPT TO", code, text)
            try:
                code, text = smtp.data(msg.as_bytes())
            except smtplib.SMTPDataError as exc:
                return refused("DATA", exc.smtp_code, exc.smtp_error)
            if code != 250:
                return refused("end of DATA", code, text)
    except (OSError, smtplib.SMTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return error(f"send-test: cannot talk to the listener at {where}: {reason}")
    reply = f"{code} {_text(text)}"
    match = _QUEUED_AS.search(reply)
    queue_id = match.group(1) if match else None
    if getattr(args, "json", False):
        print_json({"ok": True, "queue_id": queue_id, "reply": reply})
    else:
        print(f"queued as {queue_id} (from <{sender}> to {', '.join(args.to)} via {where})")
    return EXIT_OK


# ----------------------------------------------------------------------------------- health


def cmd_health(args: argparse.Namespace) -> int:
    settings = load_settings()
    problems = []
    checked = []
    for address in settings.listen:
        if address.port == 0:
            continue  # an ephemeral port (tests) cannot be found from outside
        host = _local(address)
        problem = _smtp_problem(host, address.port, args.timeout, address.tls)
        where = str(ListenAddress(host, address.port, address.tls))
        checked.append(where)
        if problem:
            problems.append(f"listener {where}: {problem}")
    problem = _spool_problem(settings.spool_dir)
    if problem:
        problems.append(f"spool {settings.spool_dir}: {problem}")
    cert = _certificate_note(settings)
    if problems:
        print("unhealthy: " + "; ".join(problems) + cert)
        return EXIT_FAILURE
    print(
        f"healthy: SMTP answers on {', '.join(checked)}; spool {settings.spool_dir} writable" + cert
    )
    return EXIT_OK


def _certificate_note(settings: Settings) -> str:
    """``; certificate ...`` for the health line (with a warning 14 days before expiry)."""
    from pyrelay.smtpd_tls import EXPIRY_WARNING, certificate_info, tls_wanted

    if not tls_wanted(settings):
        return ""
    info, problem = certificate_info(settings)
    if info is None:
        return f"; certificate: {problem}"
    note = f"; certificate {info.describe()}"
    left = info.expires_in()
    if left <= EXPIRY_WARNING:
        when = "EXPIRED" if left.total_seconds() <= 0 else f"expires in {left.days} days"
        note += f"; WARNING: the listener certificate {when}: renew {info.path}"
    return note


def _unverified_context() -> Any:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _client(host: str, port: int, timeout: float, implicit_tls: bool) -> Any:
    import smtplib

    if implicit_tls:
        return smtplib.SMTP_SSL(
            host, port, local_hostname="localhost", timeout=timeout, context=_unverified_context()
        )
    return smtplib.SMTP(host, port, local_hostname="localhost", timeout=timeout)


def _smtp_problem(host: str, port: int, timeout: float, implicit_tls: bool = False) -> str:
    import smtplib

    try:
        with _client(host, port, timeout, implicit_tls) as smtp:
            code, text = smtp.ehlo()
            if code != 250:
                return f"EHLO answered {code} {_text(text)}"
    except smtplib.SMTPConnectError as exc:
        return f"greeting was {exc.smtp_code} {_text(exc.smtp_error)}"
    except smtplib.SMTPServerDisconnected:
        return "closed the connection"
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    except smtplib.SMTPException as exc:
        return str(exc)
    return ""


def _spool_problem(spool_dir: Path) -> str:
    from pyrelay.spool import probe_writable

    try:
        probe_writable(spool_dir)
    except OSError as exc:
        return f"not writable: {exc.strerror or exc}"
    return ""


def _run_demo(args: argparse.Namespace) -> int:
    from pyrelay.demo import main

    return main()
