"""Boot test of the appliance image (`make image` -> out/proxyvm.qcow2), as an operator runs it.

Owns: booting the built image under qemu through its own boot loader (SeaBIOS -> SYSLINUX ->
kernel) with a config drive made by image-build/mkconfigdrive.sh, in a network namespace of its own
where two tap devices are the VM's NICs:

    namespace pvm-img-XXXXXX
      tap pvmo-XXXXXX 198.19.0.2/24 + 198.19.0.53 (Unbound: DoT on :853, signed zone lab.test)  <- eth0 (outside, 198.19.0.15)
      tap pvmi-XXXXXX 198.18.0.2/24 (the "guest": dig)                                         <- eth1 (inside, 198.18.0.1)

then asking the VM's DNS listener (dig from the namespace) for a DNSSEC-signed name and expecting a
validated answer (AD), checking what the serial console reports (config applied, proxyvm ready,
ip_forward=0, file modes), changing the policy by hot-plugging a new config drive, and powering
off through ACPI. It measures power-on -> first answer, idle RSS and image size.
Must not: send traffic anywhere but the namespace's 198.18.0.0/24 and 198.19.0.0/24 (the VM has no
other network), modify out/ (the VM writes to a throw-away qcow2 overlay), or leave qemu, Unbound or
the namespace behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.labs.pki import LabCA

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "out"
IMAGE = OUT / "proxyvm.qcow2"
MANIFEST = OUT / "proxyvm-manifest.json"
MKDRIVE = REPO / "image-build" / "mkconfigdrive.sh"

PROXY_IN, GUEST = "198.18.0.1", "198.18.0.2"
PROXY_OUT, HOST_OUT, DOT = "198.19.0.15", "198.19.0.2", "198.19.0.53"
DOT_NAME = "dot.lab.test"
WWW_IP = "198.19.0.80"

BOOT_TIMEOUT = float(os.environ.get("PROXYVM_BOOT_TIMEOUT", "420"))  # TCG on 2 shared cores
TOOLS = ("qemu-system-x86_64", "qemu-img", "ip", "dig", "unbound", "dnssec-keygen", "dnssec-signzone",
         "dnssec-dsfromkey", "mkfs.vfat", "mcopy", "genisoimage", "curl", "tcpdump")


def _skip_reason() -> str | None:
    if not IMAGE.exists():
        return "out/proxyvm.qcow2 absent: build it first with `make image` (as root)"
    if os.geteuid() != 0:
        return "the image boot test needs root (network namespace, tap devices)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"the image boot test needs {tool}"
    return None


_reason = _skip_reason()
if _reason:
    pytestmark.append(pytest.mark.skip(reason=_reason))


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), text=True, capture_output=True, check=check, timeout=timeout)


def manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


# ------------------------------------------------------------------------------------- the lab
class Namespace:
    """A network namespace with the VM's two taps, addressed on the host side."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"pvm-img-{tag}"
        self.tap_out, self.tap_in = f"pvmo-{tag}", f"pvmi-{tag}"

    def up(self) -> Namespace:
        sh("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")
        for tap, addrs in ((self.tap_out, (f"{HOST_OUT}/24", f"{DOT}/24")), (self.tap_in, (f"{GUEST}/24",))):
            self.ip("tuntap", "add", "dev", tap, "mode", "tap")
            for a in addrs:
                self.ip("addr", "add", a, "dev", tap)
            self.ip("link", "set", tap, "up")
        return self

    def ip(self, *args: str) -> None:
        sh("ip", "-n", self.name, *args)

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(*argv), check=False, timeout=timeout)

    def down(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def signed_zone(d: Path) -> Path:
    """lab.test signed with dnssec-signzone; returns the DS file (the VM's trust anchor)."""
    d.mkdir(parents=True, exist_ok=True)
    zone = d / "lab.test.zone"
    zone.write_text(
        "$TTL 300\n"
        "lab.test. IN SOA ns.lab.test. hostmaster.lab.test. 1 3600 600 86400 60\n"
        "lab.test. IN NS ns.lab.test.\n"
        f"ns.lab.test. IN A {DOT}\n"
        f"www.lab.test. IN A {WWW_IP}\n"
        f"blocked.lab.test. IN A {WWW_IP}\n"
    )
    ksk = sh("dnssec-keygen", "-q", "-K", str(d), "-a", "ECDSAP256SHA256", "-f", "KSK", "lab.test").stdout.strip()
    zsk = sh("dnssec-keygen", "-q", "-K", str(d), "-a", "ECDSAP256SHA256", "lab.test").stdout.strip()
    with zone.open("a") as f:
        for k in (ksk, zsk):
            f.write((d / f"{k}.key").read_text())
    sh("dnssec-signzone", "-q", "-d", str(d), "-K", str(d), "-o", "lab.test", "-f", str(d / "lab.test.signed"), str(zone))
    ds = d / "lab-anchor.txt"
    ds.write_text(sh("dnssec-dsfromkey", str(d / f"{ksk}.key")).stdout)
    return ds


def start_unbound(ns: Namespace, d: Path, ca: LabCA) -> subprocess.Popen[bytes]:
    cert, key = ca.issue([DOT_NAME], stem="dot")
    conf = d / "unbound.conf"
    conf.write_text(
        "server:\n"
        f"    interface: {DOT}@853\n    tls-port: 853\n"
        f'    tls-service-key: "{key}"\n    tls-service-pem: "{cert}"\n'
        f'    do-daemonize: no\n    chroot: ""\n    username: ""\n    directory: "{d}"\n'
        f'    pidfile: "{d}/unbound.pid"\n    use-syslog: no\n    logfile: "{d}/unbound.log"\n'
        "    verbosity: 1\n    log-queries: yes\n    access-control: 198.19.0.0/24 allow\n"
        '    module-config: "iterator"\n    num-threads: 1\n    local-zone: "test." nodefault\n'
        "auth-zone:\n"
        f'    name: "lab.test."\n    zonefile: "{d}/lab.test.signed"\n'
        "    for-downstream: yes\n    for-upstream: yes\n    fallback-enabled: no\n"
    )
    chk = sh("unbound-checkconf", str(conf), check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    proc = subprocess.Popen(ns.argv("unbound", "-d", "-c", str(conf)), stdout=subprocess.DEVNULL,
                            stderr=open(d / "unbound.stderr", "wb"), start_new_session=True)  # noqa: SIM115
    deadline = time.monotonic() + 15
    while ns.run("bash", "-c", f"exec 3<>/dev/tcp/{DOT}/853").returncode != 0:
        assert proc.poll() is None, (d / "unbound.stderr").read_text()
        assert time.monotonic() < deadline, "unbound did not listen on 853"
        time.sleep(0.2)
    return proc


RULES_ALLOW = """\
mode: enforce
default: deny
rules:
  - id: lab-dns
    action: allow
    protocol: dns
    guests: [lab]
    match:
      qname: ["lab.test", "*.lab.test"]
"""

RULES_BLOCK = """\
mode: enforce
default: deny
rules:
  - id: block-one
    action: deny
    protocol: dns
    match:
      qname: ["blocked.lab.test"]
  - id: lab-dns
    action: allow
    protocol: dns
    guests: [lab]
    match:
      qname: ["lab.test", "*.lab.test"]
"""


def config_drive(d: Path, ca_pem: Path, anchor: Path, rules: str, with_dns: bool, with_gateway: bool,
                 with_http: bool = False, iso: bool = False) -> Path:
    src = d / "src"
    shutil.rmtree(src, ignore_errors=True)
    (src / "network").mkdir(parents=True)
    cfg = [
        "guests:",
        f"  lab: {{addresses: [{GUEST}]}}",
        "policy: rules.yaml",
        "audit: {path: /var/log/proxyvm/audit.jsonl}",
        "state_dir: /var/lib/proxyvm",
    ]
    if with_gateway:
        cfg += ["gateway:", "  inside: eth1", "  outside: eth0"]
    if with_dns:
        cfg += [
            "dns:",
            f'  listen: ["{PROXY_IN}:53"]',
            "  upstreams:",
            f'    - {{address: "{DOT}:853", name: {DOT_NAME}}}',
            "  ca_file: lab-ca.pem",
            "  dnssec: validate",
            "  trust_anchors: lab-anchor.txt",
        ]
    if with_http:  # mitmproxy under the unit's sandbox; no HTTPS upstream here, only its listeners
        cfg += [
            "http:",
            f'  listen: ["{PROXY_IN}:80"]',
            f'  proxy_listen: ["{PROXY_IN}:3128"]',
            "  ca_file: lab-ca.pem",
        ]
    (src / "proxyvm.yaml").write_text("\n".join(cfg) + "\n")
    (src / "rules.yaml").write_text(rules)
    shutil.copy(ca_pem, src / "lab-ca.pem")
    shutil.copy(anchor, src / "lab-anchor.txt")
    # The lab has no DHCP server: the outside NIC gets a static address from the drive (this also
    # exercises replacing the image's network files from the config drive).
    (src / "network" / "10-outside.network").write_text(
        f"[Match]\nName=eth0\n\n[Network]\nAddress={PROXY_OUT}/24\nGateway={HOST_OUT}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n\n[Link]\nRequiredForOnline=no\n"
    )
    out = d / ("config.iso" if iso else "config.img")
    sh(str(MKDRIVE), *(["--iso"] if iso else []), str(src), str(out))
    return out


# ------------------------------------------------------------------------------------- the VM
def kvm_works() -> bool:
    """FIELD-NOTES: /dev/kvm exists on these machines but KVM hangs; probe with a 10 s kernel boot."""
    if os.environ.get("PROXYVM_ACCEL") in ("tcg", "kvm"):
        return os.environ["PROXYVM_ACCEL"] == "kvm"
    kernel = OUT / "proxyvm-vmlinuz"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not kernel.exists():
        return False
    try:
        p = subprocess.run(
            ["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-display", "none", "-no-reboot",
             "-serial", "stdio", "-monitor", "none", "-kernel", str(kernel),
             "-append", "console=ttyS0 panic=-1 root=/dev/null"],
            capture_output=True, timeout=10,
        )
        return b"Kernel panic" in p.stdout or b"VFS" in p.stdout
    except subprocess.TimeoutExpired:
        return False


class QMP:
    """Just enough of the QEMU Machine Protocol: commands and waiting for events."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        msg: dict[str, object] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            return r.get("return")

    def wait_event(self, name: str, timeout: float) -> dict:
        self.sock.settimeout(timeout)
        try:
            while True:
                for e in self.events:
                    if e["event"] == name:
                        self.events.remove(e)
                        return e
                self.events.append(self._read())
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Booted:
    ns: Namespace
    proc: subprocess.Popen[bytes]
    qmp: QMP
    serial: Path
    workdir: Path
    t_power_on: float
    first_answer_s: float | None
    accel: str
    with_dns: bool
    with_gateway: bool
    with_http: bool
    ca_pem: Path
    anchor: Path
    drive_id: str = "cfgdev"
    drives: int = 1

    def swap_drive(self, image: Path) -> None:
        """Unplug the current config drive and plug `image` in, as `virsh detach/attach-disk` do."""
        self.qmp.cmd("device_del", id=self.drive_id)
        self.qmp.wait_event("DEVICE_DELETED", 60)
        self.drives += 1
        node, dev = f"cfg{self.drives}", f"cfgdev{self.drives}"
        self.qmp.cmd("blockdev-add", **{"node-name": node, "driver": "raw", "read-only": True,
                                        "file": {"driver": "file", "filename": str(image), "read-only": True}})
        self.qmp.cmd("device_add", driver="virtio-blk-pci", drive=node, id=dev)
        self.drive_id = dev

    def console(self) -> str:
        return self.serial.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.console().splitlines()[-n:])

    def wait_console(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console(), start)
            if m:
                return m
            assert self.proc.poll() is None, f"qemu exited {self.proc.returncode}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no /{pattern}/ on the console after {timeout:.0f}s:\n{self.tail()}"
            time.sleep(0.5)

    def dig(self, name: str, *opts: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run("dig", f"@{PROXY_IN}", name, "A", "+time=2", "+tries=1", *opts, timeout=15)


def status_line(text: str) -> dict[str, str]:
    lines = [ln for ln in text.splitlines() if "proxyvm-status: service=" in ln]
    assert lines, "no proxyvm-status line"
    return dict(kv.split("=", 1) for kv in lines[-1].split("proxyvm-status: ", 1)[1].split() if "=" in kv)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    d = tmp_path_factory.mktemp("image-boot")
    info = manifest()
    with_dns = bool(info.get("has_dns_service"))
    with_gateway = bool(info.get("has_gateway_cli"))
    with_http = bool(info.get("has_http_service")) and os.environ.get("PROXYVM_BOOT_HTTP", "1") != "0"
    ca = LabCA(d / "pki")
    anchor = signed_zone(d / "zone")
    drive = config_drive(d / "drive", ca.ca_pem, anchor, RULES_ALLOW, with_dns, with_gateway, with_http)
    overlay = d / "overlay.qcow2"
    # 1 GiB larger than the image: the root file system must grow into it at boot.
    virtual = json.loads(sh("qemu-img", "info", "--output=json", str(IMAGE)).stdout)["virtual-size"]
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(IMAGE), "-F", "qcow2", str(overlay), str(virtual + 2**30))
    ns = Namespace().up()
    unbound = None
    proc = None
    qmp = None
    capture = None
    try:
        unbound = start_unbound(ns, d / "zone", ca)
        # Everything the VM sends on its outside NIC, for test_only_dot_leaves_the_outside_nic.
        capture = subprocess.Popen(ns.argv("tcpdump", "-i", ns.tap_out, "-U", "-n", "-w", str(d / "outside.pcap")),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        accel = "kvm" if kvm_works() else "tcg"
        serial = d / "serial.log"
        argv = ns.argv(
            "qemu-system-x86_64", "-accel", accel, "-m", "1024", "-smp", os.environ.get("PROXYVM_SMP", "2"),
            "-display", "none", "-no-reboot", "-nodefaults",
            "-serial", f"file:{serial}", "-qmp", f"unix:{d / 'qmp.sock'},server=on,wait=off",
            "-drive", f"file={overlay},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root,bootindex=1",
            "-drive", f"file={drive},if=none,id=cfg,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=cfg,id=cfgdev",
            "-netdev", f"tap,id=out,ifname={ns.tap_out},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=out,mac=52:54:00:09:00:01,romfile=",
            "-netdev", f"tap,id=in,ifname={ns.tap_in},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=in,mac=52:54:00:09:00:02,romfile=",
        )
        if os.environ.get("PROXYVM_DIRECT_KERNEL"):  # skip SeaBIOS/SYSLINUX; print systemd-analyze blame
            cmdline = (OUT / "proxyvm-cmdline.txt").read_text().strip() + " proxyvm.debug"
            argv += ["-kernel", str(OUT / "proxyvm-vmlinuz"), "-initrd", str(OUT / "proxyvm-initrd.img"),
                     "-append", cmdline]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=open(d / "qemu.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                start_new_session=True)
        qmp = QMP(d / "qmp.sock")
        booted = Booted(ns, proc, qmp, serial, d, t0, None, accel, with_dns, with_gateway, with_http, ca.ca_pem,
                        anchor)
        if with_dns:
            deadline = t0 + BOOT_TIMEOUT
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"qemu exited {proc.returncode}:\n{booted.tail()}"
                r = booted.dig("www.lab.test")
                if "status: NOERROR" in r.stdout and WWW_IP in r.stdout:
                    booted.first_answer_s = time.monotonic() - t0
                    break
                time.sleep(1)
        yield booted
    finally:
        if qmp is not None:
            qmp.close()
        for p in (proc, unbound, capture):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
        ns.down()


# ------------------------------------------------------------------------------------- tests
def test_boots_through_bootloader_and_applies_config_drive(vm: Booted) -> None:
    if not os.environ.get("PROXYVM_DIRECT_KERNEL"):
        vm.wait_console(r"SYSLINUX", 60)
    m = vm.wait_console(r"proxyvm-config: applied config drive \S+ \(sha256 [0-9a-f]+\): (\d+) files", BOOT_TIMEOUT)
    assert int(m.group(1)) == 4  # proxyvm.yaml, rules.yaml, lab-ca.pem, lab-anchor.txt
    vm.wait_console(r"proxyvm-status: service=", BOOT_TIMEOUT)
    text = vm.console()
    if manifest().get("has_cli"):
        assert "proxyvm-config: check: /etc/proxyvm/proxyvm.yaml: ok" in text, vm.tail()
    st = status_line(text)
    assert st["config"] == "inactive/success", text
    assert st["ip_forward"] == "0"
    # The disk was enlarged by 1 GiB before boot: the root grew into it.
    assert re.search(r"proxyvm-growroot: grew /dev/vda2 from \d+ MiB to \d+ MiB", text), vm.tail()
    disk_mib = manifest().get("disk_mib", 2048)
    assert int(st["root_mib"]) > disk_mib, st


def test_proxyvm_unit_ready_with_least_privilege(vm: Booted) -> None:
    vm.wait_console(r"proxyvm-status: service=", BOOT_TIMEOUT)
    files = vm.wait_console(r"proxyvm-status: config-files (.*)\n", 30)
    text = vm.console()
    st = status_line(text)
    assert st["service"] == "active" and st["ready"] == "yes", vm.tail(60)
    # Config files: 0600, owned by the service user, contents never printed.
    entries = dict(e.split(":", 1) for e in files.group(1).split())
    assert set(entries) == {"proxyvm.yaml", "rules.yaml", "lab-ca.pem", "lab-anchor.txt"}
    assert set(entries.values()) == {"600:proxyvm:proxyvm"}
    assert "BEGIN CERTIFICATE" not in text
    # The service process runs as proxyvm with only the three capabilities.
    assert st["user"] == "proxyvm"
    assert st["capeff"] == "0000000000003400", st  # CAP_NET_BIND_SERVICE|CAP_NET_ADMIN|CAP_NET_RAW
    if vm.with_gateway:
        assert st["gateway"] == "active", vm.tail(60)
    listeners = set(st["listeners"].split(","))
    if vm.with_dns:
        assert {f"udp:{PROXY_IN}:53", f"tcp:{PROXY_IN}:53"} <= listeners, st
    if vm.with_http:
        assert {f"tcp:{PROXY_IN}:80", f"tcp:{PROXY_IN}:3128"} <= listeners, st


def test_dns_answer_from_the_vm_is_validated(vm: Booted) -> None:
    if not vm.with_dns:
        pytest.skip("DNS service not built yet (protocols/dns/service.py absent in the image)")
    assert vm.first_answer_s is not None, f"no DNS answer within {BOOT_TIMEOUT:.0f}s:\n{vm.tail(60)}"
    r = vm.dig("www.lab.test")
    assert "status: NOERROR" in r.stdout and WWW_IP in r.stdout, r.stdout
    flags = re.search(r";; flags: ([a-z ]+);", r.stdout)
    assert flags and "ad" in flags.group(1).split(), r.stdout  # validated in the VM
    rt = vm.dig("www.lab.test", "+tcp")
    assert "status: NOERROR" in rt.stdout and WWW_IP in rt.stdout, rt.stdout
    # Policy: a name no rule allows is refused by the VM, not forwarded.
    rr = vm.dig("elsewhere.test")
    assert "status: REFUSED" in rr.stdout, rr.stdout


def test_http_proxy_in_the_vm_answers_with_the_policy(vm: Booted) -> None:
    """mitmproxy runs under the unit's sandbox: a request no rule allows gets 403 naming the rule."""
    if not vm.with_http:
        pytest.skip("HTTP service not built yet (protocols/http/service.py absent in the image)")
    vm.wait_console(r"proxyvm-status: service=", BOOT_TIMEOUT)
    r = vm.ns.run("curl", "-s", "-m", "20", "-w", "\n%{http_code}", "-x", f"http://{PROXY_IN}:3128",
                  "http://www.lab.test/", timeout=30)
    body, _, code = r.stdout.rpartition("\n")
    assert code == "403", r.stdout + r.stderr
    assert "default" in body, body


def test_only_dot_leaves_the_outside_nic(vm: Booted) -> None:
    """Fail closed at the image level: after the DNS and HTTP exchanges above, every IP packet the VM
    sent on its outside NIC is TLS to the DoT upstream's port 853: no plaintext DNS, no HTTP."""
    if not vm.with_dns:
        pytest.skip("DNS service not built yet (protocols/dns/service.py absent in the image)")
    r = sh("tcpdump", "-nr", str(vm.workdir / "outside.pcap"), f"ip and src host {PROXY_OUT}", check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, f"the VM sent nothing on its outside NIC (no DoT?): {r.stderr}"
    stray = [ln for ln in lines if f" {PROXY_OUT}." not in ln or f"> {DOT}.853:" not in ln]
    assert not stray, "\n".join(stray[:20])


def test_policy_change_by_hotplugging_a_new_config_drive(vm: Booted) -> None:
    """Later changes: a new drive replaces the files and the proxy reloads (SIGHUP)."""
    if not vm.with_dns:
        pytest.skip("DNS service not built yet (protocols/dns/service.py absent in the image)")
    assert "status: NOERROR" in vm.dig("blocked.lab.test").stdout
    mark = len(vm.console())
    drive2 = config_drive(vm.workdir / "drive2", vm.ca_pem, vm.anchor, RULES_BLOCK, vm.with_dns, vm.with_gateway,
                          vm.with_http, iso=True)  # the ISO 9660 flavour of the drive
    vm.swap_drive(drive2)
    vm.wait_console(r"proxyvm-config: applied config drive", 180, start=mark)
    vm.wait_console(r"proxyvm-config: proxyvm: reload done", 60, start=mark)
    deadline = time.monotonic() + 60
    while "status: REFUSED" not in (r := vm.dig("blocked.lab.test")).stdout:
        assert time.monotonic() < deadline, f"policy not reloaded:\n{r.stdout}\n{vm.tail()}"
        time.sleep(1)
    assert "status: NOERROR" in vm.dig("www.lab.test").stdout  # still serving: reloaded, not dropped


def test_invalid_config_drive_is_rejected_and_previous_config_kept(vm: Booted) -> None:
    vm.wait_console(r"proxyvm-status: service=", BOOT_TIMEOUT)
    mark = len(vm.console())
    bad_rules = RULES_BLOCK.replace("action: deny", "action: deny\n    colour: red")  # unknown key
    bad = config_drive(vm.workdir / "drive-bad", vm.ca_pem, vm.anchor, bad_rules, vm.with_dns, vm.with_gateway,
                       vm.with_http)
    vm.swap_drive(bad)
    m = vm.wait_console(r"proxyvm-config: (REJECTED|applied) config drive", 180, start=mark)
    if not manifest().get("has_cli"):
        pytest.skip("proxyvm CLI not built yet: nothing validates the drive")
    assert m.group(1) == "REJECTED", vm.tail()
    # The check's located error reaches the console, the secrets' content does not.
    assert re.search(r"proxyvm-config: check: .*rules\.yaml:\d+:\d+", vm.console()[mark:]), vm.tail()
    assert "BEGIN CERTIFICATE" not in vm.console()
    if vm.with_dns:  # still serving, with the previous (valid) policy
        assert "status: NOERROR" in vm.dig("www.lab.test").stdout
        assert "status: REFUSED" in vm.dig("blocked.lab.test").stdout


def test_sidecar_template_has_both_networks_and_the_config_drive() -> None:
    import xml.etree.ElementTree as ET

    dom = ET.parse(OUT / "proxyvm-sidecar.xml").getroot()
    ifaces = dom.findall("./devices/interface")
    assert [i.get("type") for i in ifaces] == ["network", "bridge"]  # eth0 outside, eth1 inside
    assert all(i.find("model").get("type") == "virtio" for i in ifaces)
    disks = dom.findall("./devices/disk")
    assert disks[0].find("driver").get("type") == "qcow2" and disks[0].find("boot").get("order") == "1"
    assert disks[1].find("readonly") is not None and disks[1].find("boot") is None
    assert dom.find("./devices/console/target").get("type") == "serial"
    assert dom.find("./features/acpi") is not None  # virsh shutdown = ACPI power button
    net = ET.parse(OUT / "proxyvm-inside-network.xml").getroot()
    assert net.find("forward") is None and net.find("ip") is None  # isolated: the host takes no part
    assert net.find("bridge").get("name") == ifaces[1].find("source").get("bridge")
    if shutil.which("virt-xml-validate"):  # libvirt's own schema: `virsh define` will accept them
        for path, kind in ((OUT / "proxyvm-sidecar.xml", "domain"), (OUT / "proxyvm-inside-network.xml", "network")):
            r = sh("virt-xml-validate", str(path), kind, check=False)
            assert r.returncode == 0, r.stdout + r.stderr


def test_powers_off_cleanly_and_reports_figures(vm: Booted) -> None:
    vm.wait_console(r"proxyvm-status: service=", BOOT_TIMEOUT)
    st = status_line(vm.console())
    t = time.monotonic()
    vm.qmp.cmd("system_powerdown")
    rc = vm.proc.wait(120)
    shutdown_s = time.monotonic() - t
    assert rc == 0
    assert "reboot: Power down" in vm.console(), vm.tail()
    figures = {
        "accel": vm.accel,
        "qcow2_mib": round(IMAGE.stat().st_size / 2**20, 1),
        "power_on_to_first_answer_s": None if vm.first_answer_s is None else round(vm.first_answer_s, 1),
        "proxyvm_idle_rss_mib": round(int(st["rss_kib"]) / 1024, 1),
        "proxyvm_processes": int(st["processes"]),
        "services": ",".join(n for n, on in (("dns", vm.with_dns), ("http", vm.with_http)) if on),
        "shutdown_s": round(shutdown_s, 1),
    }
    (vm.workdir / "figures.json").write_text(json.dumps(figures))
    print("\nimage boot figures:", json.dumps(figures))
    print("\n".join(ln for ln in vm.console().splitlines() if "proxyvm-status:" in ln))
    assert figures["qcow2_mib"] < 300
