#!/usr/bin/env python3
"""One QEMU migration of a memory image between two QEMU processes on loopback, for
side-by-side figures with `livemig send`/`recv` (scripts/send_recv_throughput.sh,
QEMU=1).

The source guest's RAM is the image itself (memory-backend-file, share=off: a
private mapping, as `livemig send --image` maps it); the guest never runs (-S), so
the migration is one pass over a stopped guest, as `send` of an image is. The
destination's RAM is either committed when QEMU starts (prealloc=on, QEMU's
-mem-prealloc: a destination prepared in advance) or fresh anonymous memory. Both
sides use multifd with CHANNELS channels and no bandwidth cap.

Prints one JSON object: total_ms (QEMU's own `total-time`, source side: what QEMU
reports and the figure compared), until_loaded_ms (from `migrate` until the
destination has left the `inmigrate` state, polled every 1 ms), setup_ms,
transferred bytes, guest_gib_per_s (image size / total time) and `verified`: the
destination's guest-physical memory, dumped with `pmemsave` after the migration,
equals the image outside the legacy 640 KiB - 1 MiB window (ROM shadow on the pc
machine).

Usage: qemu_migrate.py IMAGE SIZE_GIB {prepared|fresh} [CHANNELS] [--no-verify]
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

QEMU = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
DEADLINE_S = 120.0


class Qmp:
    def __init__(self, path, proc):
        end = time.monotonic() + 30
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"QEMU did not open its QMP socket {path}")
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.s.settimeout(DEADLINE_S)
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r["return"]


def qemu(tmp, name, size_gib, backend, extra):
    sock = os.path.join(tmp, f"{name}.qmp")
    args = [QEMU, "-accel", "kvm", "-M", "pc", "-nodefaults", "-display", "none",
            "-S", "-m", f"{size_gib}G", "-object", backend,
            "-machine", "memory-backend=ram0",
            "-qmp", f"unix:{sock},server=on,wait=off"] + extra
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{name}.err"), "w"))
    return p, Qmp(sock, p)


def caps(q, channels):
    q.cmd("migrate-set-capabilities",
          capabilities=[{"capability": "multifd", "state": True}])
    q.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                       "max-bandwidth": 1 << 40})


def same_outside_rom_window(dump, image):
    lo, hi = 0xA0000, 0x100000
    with open(dump, "rb") as a, open(image, "rb") as b:
        off = 0
        while True:
            x, y = a.read(1 << 24), b.read(1 << 24)
            if not x and not y:
                return True
            if len(x) != len(y):
                return False
            if x != y:
                # Compare again with the ROM window masked out.
                for i in range(0, len(x), 4096):
                    if lo <= off + i < hi:
                        continue
                    if x[i:i + 4096] != y[i:i + 4096]:
                        return False
            off += len(x)


def main():
    image, size_gib, dest = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    channels = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4].isdigit() else 2
    verify = "--no-verify" not in sys.argv
    size = size_gib << 30
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dst_backend = f"memory-backend-ram,id=ram0,size={size}" + (",prealloc=on" if dest == "prepared" else "")
            dp, dq = qemu(tmp, "dst", size_gib, dst_backend, ["-incoming", "defer"])
            procs.append(dp)
            sp, sq = qemu(tmp, "src", size_gib,
                          f"memory-backend-file,id=ram0,size={size},mem-path={image},share=off", [])
            procs.append(sp)
            for q in (dq, sq):
                caps(q, channels)
            dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            t0 = time.monotonic()
            sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            end = time.monotonic() + DEADLINE_S
            while True:
                m = sq.cmd("query-migrate")
                if m.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"migration not done after {DEADLINE_S} s: {m.get('status')}")
                time.sleep(0.001)
            if m["status"] != "completed":
                raise RuntimeError(f"migration {m['status']}: {m.get('error-desc', '')}")
            # Wait for the destination to have loaded everything.
            while dq.cmd("query-status")["status"] == "inmigrate":
                if time.monotonic() > end:
                    raise RuntimeError("destination still loading")
                time.sleep(0.001)
            loaded_ms = (time.monotonic() - t0) * 1e3
            total_ms = m["total-time"]
            out = {"tool": "qemu", "version": sq.cmd("query-version")["package"].strip() or "7.2",
                   "destination": dest, "channels": channels, "total_ms": total_ms,
                   "until_loaded_ms": loaded_ms, "setup_ms": m.get("setup-time"), "transferred": m["ram"]["transferred"],
                   "guest_gib_per_s": size / (1 << 30) / (total_ms / 1e3)}
            if verify:
                dump = os.path.join("/dev/shm", f"qemu-dump-{os.getpid()}.bin")
                try:
                    dq.cmd("pmemsave", val=0, size=size, filename=dump)
                    out["verified"] = same_outside_rom_window(dump, image)
                finally:
                    if os.path.exists(dump):
                        os.unlink(dump)
            print(json.dumps(out))
        finally:
            for p in procs:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
