"""``pyrelay dkim show|check``: the DNS records to publish for the DKIM keys, and whether DNS
publishes them."""

from __future__ import annotations

import argparse
from typing import Any

from pyrelay.cmdutil import Subparsers, add_command, add_json_flag, error, print_json
from pyrelay.config import load_settings
from pyrelay.constants import EXIT_FAILURE, EXIT_OK


def register(sub: Subparsers) -> None:
    top = add_command(
        sub,
        "dkim",
        cmd_dkim_show,
        "DKIM keys: the DNS records to publish, and whether they are published",
        "Without an action, like `dkim show`.  Keys are read from PYRELAY_DKIM_KEY_DIR "
        "(default <spool>/dkim, files <domain>.private), selectors from DKIM_SELECTOR.",
        "1 no key, or a record is missing or different (check)",
    )
    add_json_flag(top, top=True)
    actions = top.add_subparsers(title="actions", metavar="ACTION")
    p = add_command(
        actions,
        "show",
        cmd_dkim_show,
        "print each key's DNS TXT record as a zone-file line",
        'One zone-file line per key: <selector>._domainkey.<domain>. IN TXT "v=DKIM1; ...", '
        "long values split into quoted strings of at most 255 characters.",
        "1 no key",
    )
    add_json_flag(p)
    p = add_command(
        actions,
        "check",
        cmd_dkim_check,
        "look each record up in DNS and compare it with the key",
        "For each key: ok, missing (no record), or different key (the record holds another "
        "public key); exit 1 unless all are ok.",
        "1 a record is missing or different, or no key",
    )
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="per lookup")
    add_json_flag(p)


def _keys() -> list[Any]:
    from pyrelay import dkim
    from pyrelay.errors import ConfigError

    s = load_settings()
    directory = dkim.key_dir(s.spool_dir, s.dkim_key_dir)
    try:
        return dkim.Signer.load(directory, dkim.Selectors.parse(s.dkim_selector)).all_keys()
    except dkim.DKIMError as exc:
        raise ConfigError(f"PYRELAY_DKIM_KEY_DIR: {exc}") from None


def _describe(key: Any) -> dict[str, Any]:
    return {
        "domain": key.domain,
        "selector": key.selector,
        "algorithm": key.algorithm.decode(),
        "name": key.record_name + ".",
        "record": key.record,
        "zone_line": key.zone_line(),
        "key_file": str(key.path),
    }


def cmd_dkim_show(args: argparse.Namespace) -> int:
    keys = _keys()
    if getattr(args, "json", False):
        print_json([_describe(k) for k in keys])
    else:
        for key in keys:
            print(key.zone_line())
    if not keys:
        return error("no DKIM key (PYRELAY_DKIM_KEY_DIR has no <domain>.private)")
    return EXIT_OK


def cmd_dkim_check(args: argparse.Namespace) -> int:
    import asyncio

    from pyrelay import dkim

    keys = _keys()

    async def run() -> list[dkim.RecordCheck]:
        return [await dkim.check_record(k, args.timeout) for k in keys]

    results = asyncio.run(run())
    if getattr(args, "json", False):
        print_json(
            [{**_describe(r.key), "status": r.status, "published": r.detail} for r in results]
        )
    else:
        for r in results:
            print(
                f"{r.key.record_name}: {r.status}" + (f" ({r.detail})" if r.status != "ok" else "")
            )
            if r.status != "ok":
                print(f"  publish: {r.key.zone_line()}")
    if not keys:
        return error("no DKIM key (PYRELAY_DKIM_KEY_DIR has no <domain>.private)")
    return EXIT_OK if all(r.status == "ok" for r in results) else EXIT_FAILURE
