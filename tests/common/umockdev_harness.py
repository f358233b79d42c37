#!/usr/bin/python3
"""umockdev test bed for lucidgate's end-to-end tests.

Run under `umockdev-wrapper /usr/bin/python3 umockdev_harness.py LUCIDGATE FIXTURE`.
Prints `root <dir>` (hand it to the daemon as UMOCKDEV_DIR), then takes one command per line
on stdin and answers one line (`ok ...` or `err ...`):

  add IDX SERIAL VENDOR MODEL [quiet]  add a CDC-ACM tty /dev/ttyACM<IDX> (USB port 1-<IDX+1>)
                                       from the fixture with these udev strings, start
                                       `lucidgate emulate --fd` on its pty; `quiet`: no uevent
                                       (present before the daemon starts). Answers the syspath.
  change SYSPATH KEY=VALUE...          set properties and send a `change` uevent
  remove SYSPATH                       send `remove` and take the device out of the bed
  addstick IDX IMAGE FSTYPE            add a USB mass-storage partition /dev/sd<a+IDX>1 whose
                                       content is a copy of the file IMAGE, with ID_FS_TYPE=FSTYPE;
                                       answers the syspath and the backing file (the stick's bytes)
  removestick SYSPATH                  send `remove` for a stick and take it out of the bed
  quit

Limit of umockdev 0.17: a removed tty's name (and USB socket) cannot be added again in the
same bed, so a replug in a test uses a new IDX, as a module moved to another socket would.

The daemon opens the tty through the preload; a pass-through ioctl handler runs the serial
ioctls (TCGETS2, TIOCEXCL ...) on the backing pty, as a real cdc_acm tty would.
"""
import os
import subprocess
import sys
import threading

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

TIOCEXCL, TIOCNXCL = 0x540C, 0x540D


class PassThrough(UMockdev.IoctlBase):
    def do_handle_ioctl(self, client):
        if client.get_request() in (TIOCEXCL, TIOCNXCL):
            client.complete(0, 0)
        else:
            ret, err = client.execute()
            client.complete(ret, err)
        return True


def main():
    lucidgate, fixture_path = sys.argv[1], sys.argv[2]
    with open(fixture_path) as f:
        fixture = f.read()
    tb = UMockdev.Testbed.new()
    handler = PassThrough()
    threading.Thread(target=GLib.MainLoop().run, daemon=True).start()
    emulators = {}  # syspath -> Popen
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("UMOCKDEV_DIR", None)
    print("root", tb.get_root_dir(), flush=True)

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            if cmd == "add":
                idx, serial, vendor, model = int(args[0]), args[1], args[2], args[3]
                quiet = len(args) > 4 and args[4] == "quiet"
                port = "1-%d" % (idx + 1)
                text = (
                    fixture.replace("usb1/1-1", "usb1/" + port)
                    .replace("1-1:1.0", port + ":1.0")
                    .replace("ttyACM0", "ttyACM%d" % idx)
                    .replace("MINOR=0", "MINOR=%d" % idx)
                    .replace("dev=166:0", "dev=166:%d" % idx)
                    .replace("usb-0:1:1.0", "usb-0:%d:1.0" % (idx + 1))
                    .replace("bus/usb/001/005", "bus/usb/001/%03d" % (idx + 5))
                    .replace("11001001FA480000", serial)
                    .replace("ID_VENDOR=deciphe_it", "ID_VENDOR=" + vendor)
                    .replace("deciphe_it_LucidIo_AO4", vendor + "_" + model)
                    .replace("ID_MODEL=LucidIo_AO4", "ID_MODEL=" + model)
                )
                devnode = "/dev/ttyACM%d" % idx
                syspath = "/sys/devices/pci0000:00/0000:00:14.0/usb1/%s/%s:1.0/tty/ttyACM%d" % (
                    port,
                    port,
                    idx,
                )
                # The ioctl handler first: adding the device may already announce it, and a
                # daemon that opens the node before the handler is there loses its process.
                tb.attach_ioctl(devnode, handler)
                tb.add_from_string(text)
                fd = tb.get_dev_fd(devnode)
                cls = serial[:4] if len(serial) == 16 else "1100"
                emu_serial = serial if len(serial) == 16 else "11001001FA4800%02X" % idx
                emulators[syspath] = subprocess.Popen(
                    [lucidgate, "emulate", "--class", cls, "--serial", emu_serial, "--fd", str(fd)],
                    pass_fds=(fd,),
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
                if not quiet:
                    tb.uevent(syspath, "add")
                print("ok", syspath, flush=True)
            elif cmd == "change":
                syspath = args[0]
                for kv in args[1:]:
                    k, v = kv.split("=", 1)
                    tb.set_property(syspath, k, v)
                tb.uevent(syspath, "change")
                print("ok", flush=True)
            elif cmd == "remove":
                syspath = args[0]
                tb.uevent(syspath, "remove")
                # Unplugging takes the whole USB device (interface and tty under it) away.
                # Child first, as the kernel removes them.
                interface = syspath.split("/tty/")[0]
                usb_device = interface.rsplit("/", 1)[0]
                for dev in (syspath, interface, usb_device):
                    tb.remove_device(dev)
                emu = emulators.pop(syspath, None)
                if emu:
                    emu.terminate()
                    emu.wait()
                print("ok", flush=True)
            elif cmd == "addstick":
                idx, image, fstype = int(args[0]), args[1], args[2]
                name = "sd%s1" % chr(ord("b") + idx)
                port = "1-%d" % (20 + idx)
                syspath = (
                    "/sys/devices/pci0000:00/0000:00:14.0/usb1/%s/%s:1.0/host%d/target%d:0:0/%d:0:0:0/block/%s/%s"
                    % (port, port, idx, idx, idx, name[:-1], name)
                )
                text = (
                    "P: /devices/pci0000:00/0000:00:14.0/usb1/%s\nE: DEVTYPE=usb_device\nE: SUBSYSTEM=usb\nE: ID_BUS=usb\nA: serial=STICK%d\n\n"
                    "P: %s\nN: %s=00\nE: DEVNAME=/dev/%s\nE: DEVTYPE=partition\nE: SUBSYSTEM=block\n"
                    "E: ID_BUS=usb\nE: ID_FS_TYPE=%s\nE: ID_FS_LABEL=KEYS\nA: dev=8:%d\nA: partition=1\n"
                    % (port, idx, syspath[len("/sys"):], name, name, fstype, 16 * (idx + 1) + 1)
                )
                # Adding the device already announces it (with a 1-byte node, "not FAT"); the
                # content is swapped in whole (rename), then the stick is announced again, as a
                # card reader does when media goes in.
                tb.add_from_string(text)
                backing = os.path.join(tb.get_root_dir(), "dev", name)
                with open(image, "rb") as src, open(backing + ".tmp", "wb") as dst:
                    dst.write(src.read())
                os.replace(backing + ".tmp", backing)
                tb.uevent(syspath, "change")
                print("ok", syspath, backing, flush=True)
            elif cmd == "removestick":
                syspath = args[0]
                tb.uevent(syspath, "remove")
                tb.remove_device(syspath)
                print("ok", flush=True)
            elif cmd == "quit":
                break
            else:
                print("err unknown command", cmd, flush=True)
        except Exception as e:  # report, keep the bed alive
            print("err", repr(e).replace("\n", " "), flush=True)
    for emu in emulators.values():
        emu.terminate()
        emu.wait()
    print("ok", flush=True)


if __name__ == "__main__":
    main()
