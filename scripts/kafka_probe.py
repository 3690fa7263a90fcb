#!/usr/bin/env python3
"""Health probe for a Kafka-protocol broker, standard library only.

Sends ApiVersions v0 and then a Metadata request (v1, or v0 if that is all the broker
offers) over a raw TCP socket and parses the replies. A wedged tansu keeps accepting TCP
connections (see BROKER.md), so only a parsed answer counts as "up".

    kafka_probe.py [HOST:PORT] [--timeout SECONDS] [--quiet]

Exit status 0 when the broker answered sensibly, 1 otherwise (the reason is printed).
"""

import argparse
import os
import socket
import struct
import sys
import time

API_METADATA = 3
API_VERSIONS = 18
CLIENT_ID = b"tally-probe"
MAX_FRAME = 64 * 1024 * 1024
UNKNOWN_SERVER_ERROR = -1


class ProbeError(Exception):
    pass


class Reader:
    """Big-endian cursor over one response body; running past the end means garbled."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ProbeError(
                f"garbled reply: truncated at byte {self.pos} of {len(self.data)}"
            )
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def int8(self):
        return self.take(">b")

    def int16(self):
        return self.take(">h")

    def int32(self):
        return self.take(">i")

    def string(self, nullable=False):
        n = self.int16()
        if n == -1 and nullable:
            return None
        if n < 0:
            raise ProbeError(f"garbled reply: string length {n} at byte {self.pos}")
        if self.pos + n > len(self.data):
            raise ProbeError(f"garbled reply: string runs past the end at {self.pos}")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def array(self, item):
        n = self.int32()
        if n == -1:
            return []
        if n < 0 or n > len(self.data):
            raise ProbeError(f"garbled reply: array length {n} at byte {self.pos}")
        return [item() for _ in range(n)]

    def done(self):
        if self.pos != len(self.data):
            raise ProbeError(
                f"garbled reply: {len(self.data) - self.pos} unexpected trailing byte(s)"
            )


class Connection:
    def __init__(self, host, port, timeout):
        self.deadline = time.monotonic() + timeout
        self.correlation_id = 0
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except socket.timeout:
            raise ProbeError(f"timed out connecting to {host}:{port}") from None
        except OSError as e:
            raise ProbeError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None

    def close(self):
        self.sock.close()

    def _remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProbeError("timed out waiting for the broker's reply")
        return left

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(self._remaining())
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                raise ProbeError("timed out waiting for the broker's reply") from None
            except OSError as e:
                raise ProbeError(f"connection error: {e.strerror or e}") from None
            if not chunk:
                raise ProbeError(
                    f"broker closed the connection after {len(buf)} of {n} byte(s)"
                )
            buf += chunk
        return bytes(buf)

    def request(self, api_key, api_version, body):
        self.correlation_id += 1
        header = struct.pack(
            ">hhih", api_key, api_version, self.correlation_id, len(CLIENT_ID)
        )
        payload = header + CLIENT_ID + body
        self.sock.settimeout(self._remaining())
        try:
            self.sock.sendall(struct.pack(">i", len(payload)) + payload)
        except socket.timeout:
            raise ProbeError("timed out sending the request") from None
        except OSError as e:
            raise ProbeError(f"connection error while sending: {e.strerror or e}") from None

        (size,) = struct.unpack(">i", self._recv_exact(4))
        if size < 4 or size > MAX_FRAME:
            raise ProbeError(f"garbled reply: frame size {size}")
        frame = Reader(self._recv_exact(size))
        got = frame.int32()
        if got != self.correlation_id:
            raise ProbeError(
                f"garbled reply: correlation id {got}, expected {self.correlation_id}"
            )
        return Reader(frame.data[frame.pos :])


def api_versions(conn):
    r = conn.request(API_VERSIONS, 0, b"")
    error = r.int16()
    keys = r.array(lambda: (r.int16(), r.int16(), r.int16()))
    r.done()
    if error != 0:
        raise ProbeError(f"ApiVersions error code {error}")
    return {key: (lo, hi) for key, lo, hi in keys}


def metadata(conn, version):
    # v0: an empty topic list means all topics; v1: null (-1) means all topics.
    r = conn.request(API_METADATA, version, struct.pack(">i", -1 if version >= 1 else 0))

    def broker():
        node = r.int32()
        host = r.string()
        port = r.int32()
        if version >= 1:
            r.string(nullable=True)  # rack
        return node, host, port

    def partition():
        error = r.int16()
        r.int32()  # partition index
        r.int32()  # leader
        r.array(r.int32)  # replicas
        r.array(r.int32)  # isr
        return error

    def topic():
        error = r.int16()
        name = r.string()
        if version >= 1:
            r.int8()  # is_internal
        return name, error, r.array(partition)

    brokers = r.array(broker)
    controller = r.int32() if version >= 1 else None
    topics = r.array(topic)
    r.done()
    return brokers, controller, topics


def probe(host, port, timeout):
    conn = Connection(host, port, timeout)
    try:
        versions = api_versions(conn)
        if API_METADATA not in versions:
            raise ProbeError("broker does not list the Metadata API in ApiVersions")
        lo, hi = versions[API_METADATA]
        version = 1 if lo <= 1 <= hi else 0
        if not lo <= version <= hi:
            raise ProbeError(f"broker offers Metadata v{lo}..v{hi} only")
        brokers, controller, topics = metadata(conn, version)
    finally:
        conn.close()

    if not brokers:
        raise ProbeError("Metadata reply lists no brokers")
    # A wedged tansu answers UNKNOWN_SERVER_ERROR to everything that touches storage.
    broken = [
        name
        for name, error, parts in topics
        if error == UNKNOWN_SERVER_ERROR or UNKNOWN_SERVER_ERROR in parts
    ]
    if broken:
        raise ProbeError(f"UNKNOWN_SERVER_ERROR for topic(s) {', '.join(sorted(broken))}")

    listed = " ".join(f"{node} {h}:{p}" for node, h, p in brokers)
    line = f"broker ok: {len(brokers)} broker(s) [{listed}], {len(topics)} topic(s)"
    if controller is not None:
        line += f", controller {controller}"
    errors = sorted(f"{name}={error}" for name, error, _ in topics if error != 0)
    if errors:
        line += f"; topic errors: {' '.join(errors)}"
    return line


def parse_address(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main():
    default = os.environ.get("TALLY_KAFKA_BROKERS", "127.0.0.1:19092").split(",")[0]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=default, type=parse_address,
                        help=f"HOST:PORT (default {default})")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds for the whole exchange (default 3)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    args = parser.parse_args()
    host, port = args.address
    try:
        line = probe(host, port, args.timeout)
    except ProbeError as e:
        print(f"broker {host}:{port} not ok: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
