#!/usr/bin/env python3
"""A loopback TCP proxy that counts the bytes crossing it, for the idle-poll benchmark.

usage: byte-counter.py LISTEN_PORT TARGET_PORT COUNT_FILE
Every connection is forwarded to 127.0.0.1:TARGET_PORT; the totals "connections bytes_up
bytes_down" are written to COUNT_FILE as they change (connections counted as they open, so a
connection kept alive across polls is one connection and its bytes still count).
"""
import socket
import sys
import threading

listen_port, target_port, count_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
totals = {"connections": 0, "up": 0, "down": 0}


def pump(src, dst, key):
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if not data:
            break
        with lock:
            totals[key] += len(data)
            write_totals()
        try:
            dst.sendall(data)
        except OSError:
            break
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def write_totals():
    with open(count_file, "w") as f:
        f.write(f'{totals["connections"]} {totals["up"]} {totals["down"]}\n')


def handle(client):
    with lock:
        totals["connections"] += 1
        write_totals()
    upstream = socket.create_connection(("127.0.0.1", target_port))
    a = threading.Thread(target=pump, args=(client, upstream, "up"))
    b = threading.Thread(target=pump, args=(upstream, client, "down"))
    a.start(); b.start(); a.join(); b.join()
    client.close(); upstream.close()


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen(64)
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
