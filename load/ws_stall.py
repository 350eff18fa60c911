#!/usr/bin/env python3
"""A WebSocket client that subscribes at connect and never reads (BENCHMARKS.md, "Copies of a
table for one client"): it opens /ws?table=TABLE&where=WHERE (or &format=rows when WHERE is
empty) with a 4 KiB receive buffer, sends a ping frame every 2 s so that the idle timeout does not
close it, and exits after SECS seconds (or when the server closes it).

    python3 load/ws_stall.py 127.0.0.1 38561 game_odds "odd1 > '0' OR game_id = 'x1'" 24

Standard library only; loopback use."""
import base64
import os
import socket
import sys
import time
import urllib.parse


def main():
    if len(sys.argv) != 6:
        print(__doc__)
        sys.exit(2)
    host, port, table, where, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    q = urllib.parse.urlencode({"table": table, "where": where} if where else {"table": table, "format": "rows"})
    s.sendall(
        f"GET /ws?{q} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    print(s.recv(200).split(b"\r\n")[0].decode(errors="replace"))
    started = time.time()
    for _ in range(max(secs // 2, 1)):
        time.sleep(2)
        try:
            # a masked ping frame with no payload
            s.sendall(bytes([0x89, 0x80]) + os.urandom(4))
        except OSError as e:
            print(f"closed after {time.time() - started:.1f} s: {e}")
            return


main()
