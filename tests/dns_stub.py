"""A DNS server answering TXT queries from a dict, for DKIM tests (the verifiers and
``pyrelay dkim check`` resolve the public keys through it)."""

from __future__ import annotations

import socket
import struct
import threading


def _qname(packet: bytes, pos: int) -> tuple[str, int]:
    labels = []
    while True:
        n = packet[pos]
        pos += 1
        if n == 0:
            break
        labels.append(packet[pos : pos + n].decode("ascii", "replace"))
        pos += n
    return ".".join(labels).lower() + ".", pos


def answer(packet: bytes, zone: dict[str, str]) -> bytes:
    (ident,) = struct.unpack("!H", packet[:2])
    name, pos = _qname(packet, 12)
    qtype, _qclass = struct.unpack("!HH", packet[pos : pos + 4])
    question = packet[12 : pos + 4]
    txt = zone.get(name)
    if txt is None:
        flags = 0x8183  # NXDOMAIN
        return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0) + question
    if qtype != 16:
        return struct.pack("!HHHHHH", ident, 0x8180, 1, 0, 0, 0) + question
    data = txt.encode("ascii")
    rdata = b"".join(
        bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)
    )
    rr = struct.pack("!HHHIH", 0xC00C, 16, 1, 60, len(rdata)) + rdata
    return struct.pack("!HHHHHH", ident, 0x8180, 1, 1, 0, 0) + question + rr


class DNSStub:
    """Serves ``zone`` (``{"name.": "txt"}``, changeable while running) on 127.0.0.1, UDP, an
    ephemeral port, from a thread."""

    def __init__(self, zone: dict[str, str] | None = None) -> None:
        self.zone: dict[str, str] = dict(zone or {})
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                self.queries.append(_qname(packet, 12)[0])
                self.sock.sendto(answer(packet, self.zone), peer)
            except (IndexError, struct.error, OSError):
                continue

    def close(self) -> None:
        self.sock.close()
