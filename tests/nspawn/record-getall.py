#!/usr/bin/env python3
"""Records systemd's raw replies to GetAll(Service) and GetAll(Unit) on containerd.service,
the fixtures of runtime/src/install/systemd/dbus.rs's decoder test
(runtime/tests/fixtures/systemd/). Written independently of the Rust client on purpose.

    INIT=$(tests/nspawn/up.sh rec | sed -n 's/^INIT_PID=//p')
    nsenter -t $INIT -p -- python3 tests/nspawn/record-getall.py \
        /proc/$INIT/root/run/systemd/private runtime/tests/fixtures/systemd
    tests/nspawn/down.sh rec

(nsenter -p: systemd drops private-socket peers whose PID it cannot see.)
"""
import os, socket, struct, sys

sock_path, out_dir = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
s.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\nBEGIN\r\n")
line = b""
while not line.endswith(b"\r\n"):
    line += s.recv(1)
assert line.startswith(b"OK "), line

def pad(b, a):
    return b + b"\0" * ((-len(b)) % a)

def field(code, ty, val):
    v = val.encode()
    if ty == "g":
        body = bytes([len(v)]) + v + b"\0"
    else:
        body = struct.pack("<I", len(v)) + v + b"\0"
    return bytes([code, 1]) + ty.encode() + b"\0" + body

def call(serial, path, iface, member, sarg):
    a = sarg.encode()
    body = struct.pack("<I", len(a)) + a + b"\0"
    fields = b""
    for f in [field(1, "o", path), field(2, "s", iface), field(3, "s", member), field(6, "s", "org.freedesktop.systemd1"), field(8, "g", "s")]:
        fields = pad(fields, 8) + f
    hdr = b"l\x01\x00\x01" + struct.pack("<III", len(body), serial, len(fields)) + fields
    return pad(hdr, 8) + body

def recv_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c
        b += c
    return b

def read_msg():
    h = recv_exact(16)
    blen, flen = struct.unpack("<I", h[4:8])[0], struct.unpack("<I", h[12:16])[0]
    total = ((16 + flen + 7) // 8) * 8 + blen
    return h + recv_exact(total - 16)

path = "/org/freedesktop/systemd1/unit/containerd_2eservice"
for serial, iface, name in [(1, "org.freedesktop.systemd1.Service", "getall-service-containerd.bin"), (2, "org.freedesktop.systemd1.Unit", "getall-unit-containerd.bin")]:
    s.sendall(call(serial, path, "org.freedesktop.DBus.Properties", "GetAll", iface))
    m = read_msg()
    assert m[1] == 2, m[:64]
    open(os.path.join(out_dir, name), "wb").write(m)
    print(name, len(m))
