"""What other tools write for kvmctl's objects compares equal to what kvmctl writes.

virt-install, virt-manager and virsh spell the same settings in other ways (a netmask for a
prefix, a volume's path for the pool and volume, ...); host/facts.py normalises each spelling so
that adopting such an object plans no spurious change. The XML below is what libvirt 9.0 wrote
back for such objects (recorded ones are in tests/golden/plan/virt-install-*, virsh-*).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lxml import etree
from test_plan_golden import live_from_json

from kvmctl.engine import host_facts
from kvmctl.host import facts
from kvmctl.host.state import LivePool, LiveState, LiveVolume
from kvmctl.manifest import documents, validate
from kvmctl.manifest.model import ManifestSet
from kvmctl.memo import Memo
from kvmctl.plan import Options, make_plan
from kvmctl.plan.types import ChangeClass
from kvmctl.render.definitions import render_desired
from kvmctl.render.specs import Desired

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "plan"
POOL = "/var/tmp/kvmctl-tests/vi9/pool"


def _network(ip: str) -> str:
    return f"<network><name>n</name><forward mode='nat'/>{ip}</network>"


KVMCTL_IP = ("<ip address='10.231.88.1' prefix='24'><dhcp>"
             "<range start='10.231.88.100' end='10.231.88.199'/>"
             "<host mac='52:54:00:ab:88:10' name='vm' ip='10.231.88.10'/></dhcp></ip>")


def test_a_netmask_is_its_prefix_length() -> None:
    netmask = KVMCTL_IP.replace("prefix='24'", "netmask='255.255.255.0'")
    assert facts.network_diff(_network(KVMCTL_IP), _network(netmask)) == []
    assert facts.network_facts(_network(netmask))["ipv4"] == facts.Ipv4Fact("10.231.88.1", "24")


def test_no_prefix_nor_netmask_is_the_classful_prefix_as_libvirt_takes_it() -> None:
    bare = _network("<ip address='192.168.7.1'/>")
    assert facts.network_facts(bare)["ipv4"] == facts.Ipv4Fact("192.168.7.1", "24")
    assert facts.network_facts(_network("<ip address='10.1.2.3'/>"))["ipv4"].prefix == "8"
    assert facts.network_facts(_network("<ip address='172.16.0.1'/>"))["ipv4"].prefix == "16"


def test_a_different_prefix_is_still_a_difference() -> None:
    other = KVMCTL_IP.replace("prefix='24'", "netmask='255.255.255.128'")
    assert [c.field for c in facts.network_diff(_network(KVMCTL_IP), _network(other))] == \
        ["ipv4"]


def test_an_ipv6_address_first_does_not_hide_the_ipv4_one() -> None:
    ipv6_first = ("<ip family='ipv6' address='fd00::1' prefix='64'/>"
                  + KVMCTL_IP.replace("<ip ", "<ip family='ipv4' "))
    assert facts.network_diff(_network(KVMCTL_IP), _network(ipv6_first)) == []


def test_attribute_order_and_mac_case_of_dhcp_entries() -> None:
    written = ("<ip netmask='255.255.255.0' address='10.231.88.1'><dhcp>"
               "<range end='10.231.88.199' start='10.231.88.100'/>"
               "<host ip='10.231.88.10' name='vm' mac='52:54:00:AB:88:10'/></dhcp></ip>")
    assert facts.network_diff(_network(KVMCTL_IP), _network(written)) == []


def _domain(*devices: str) -> str:
    return ("<domain type='qemu'><name>vm</name><memory unit='KiB'>131072</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>"
            f"<devices>{''.join(devices)}</devices></domain>")


VOLUME_DISK = ("<disk type='volume' device='disk'><driver name='qemu' type='qcow2' "
               "discard='unmap'/><source pool='p' volume='x.qcow2'/>"
               "<target dev='vda' bus='virtio'/></disk>")
LIVE = LiveState(pools={"p": LivePool("p", "u", "<pool/>", POOL, True, True, None, (
    LiveVolume("p", "x.qcow2", f"{POOL}/x.qcow2", 1 << 24, "qcow2", None),
    LiveVolume("p", "y.raw", f"{POOL}/y.raw", 1 << 24, "raw", None)))})


def test_a_disk_given_by_its_path_is_the_volume_at_that_path() -> None:
    resolve = facts.volume_resolver(LIVE)
    for path in (f"{POOL}/x.qcow2", "/var/tmp/kvmctl-tests/vi9//pool/./x.qcow2"):
        by_path = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                   f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>")
        assert facts.diff(facts.domain_facts(_domain(VOLUME_DISK)),
                          facts.domain_facts(_domain(by_path), resolve)) == []
    block = VOLUME_DISK.replace("type='volume'", "type='block'").replace(
        "pool='p' volume='x.qcow2'", f"dev='{POOL}/x.qcow2'")
    assert facts.diff(facts.domain_facts(_domain(VOLUME_DISK)),
                      facts.domain_facts(_domain(block), resolve)) == []


def test_a_path_that_is_no_volume_or_another_volume_differs() -> None:
    resolve = facts.volume_resolver(LIVE)
    for path in ("/elsewhere/x.qcow2", f"{POOL}/y.raw"):
        by_path = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                   f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>")
        changes = facts.diff(facts.domain_facts(_domain(VOLUME_DISK)),
                             facts.domain_facts(_domain(by_path), resolve))
        assert [c.field for c in changes] == ["disk:vda"]
    # without a resolver (as before), a path is a path
    assert facts.domain_facts(_domain(VOLUME_DISK.replace("type='volume'", "type='file'")
                                      .replace("pool='p' volume='x.qcow2'",
                                               f"file='{POOL}/x.qcow2'")))[
        "disk:vda"].source == f"{POOL}/x.qcow2"


def test_a_disk_without_a_format_is_raw_as_qemu_opens_it() -> None:
    raw = VOLUME_DISK.replace("type='qcow2' ", "type='raw' ").replace("x.qcow2", "y.raw")
    no_format = raw.replace("<driver name='qemu' type='raw' discard='unmap'/>",
                            "<driver name='qemu'/>")
    assert facts.diff(facts.domain_facts(_domain(raw)), facts.domain_facts(_domain(no_format))) \
        == []
    # a qcow2 volume without a format is opened as raw: that is a difference
    qcow2_no_format = VOLUME_DISK.replace(" type='qcow2' discard='unmap'", "")
    assert [c.field for c in facts.diff(facts.domain_facts(_domain(VOLUME_DISK)),
                                        facts.domain_facts(_domain(qcow2_no_format)))] == \
        ["disk:vda"]


LOG = "/var/tmp/kvmctl-tests/vi9/vm.log"
KVMCTL_SERIAL = (f"<serial type='pty'><log file='{LOG}' append='on'/><target port='0'/></serial>"
                 "<console type='pty'><target type='serial' port='0'/></console>")


def test_a_pty_log_in_any_of_its_spellings_is_the_console_log() -> None:
    desired = facts.domain_facts(_domain(KVMCTL_SERIAL))
    for serial in (
            # virt-install --serial pty,log.file=...: no append (virtlogd appends unless "off")
            f"<serial type='pty'><log file='{LOG}'/><target type='isa-serial' port='0'/>"
            "</serial>"
            f"<console type='pty'><log file='{LOG}'/><target type='serial' port='0'/></console>",
            # a running guest's: its pty, aliases
            f"<serial type='pty'><source path='/dev/pts/3'/><log file='{LOG}' append='off'/>"
            "<target type='isa-serial' port='0'/><alias name='serial0'/></serial>"):
        assert facts.diff(desired, facts.domain_facts(_domain(serial))) == []


def test_a_file_serial_writes_the_log_but_has_no_console_and_says_so() -> None:
    file_serial = (f"<serial type='file'><source path='{LOG}'/>"
                   "<target type='isa-serial' port='0'/></serial>"
                   f"<console type='file'><source path='{LOG}'/>"
                   "<target type='serial' port='0'/></console>")
    changes = facts.diff(facts.domain_facts(_domain(KVMCTL_SERIAL)),
                         facts.domain_facts(_domain(file_serial)))
    assert [(c.field, c.old, c.new) for c in changes] == [
        ("console.log", LOG + facts.FILE_SERIAL, LOG)]


def _case(name: str) -> tuple[ManifestSet, Desired, LiveState, Options]:
    case = GOLDEN / name
    live = live_from_json(json.loads((case / "live.json").read_text()))
    docs = documents.parse_text((case / "manifest.yaml").read_text(), "manifest.yaml")
    manifest = validate.validate(docs, host_facts(live))
    opts = Options(project="golden", adopt=True)
    return manifest, render_desired(manifest, "golden", "qemu", live.hints()), live, opts


def test_a_verdict_that_looked_up_a_path_is_not_remembered() -> None:
    """The memo holds verdicts that depend on the two definitions only; whether a path is a
    pool's volume depends on the host's volumes too."""
    manifest, desired, live, opts = _case("virsh-domain-disk-no-format")
    dom = live.domains["vi9-nofmt"]
    # vi9-nofmt as kvmctl would have defined it, but with vdb given by its path
    root = etree.fromstring(desired.domains["vi9-nofmt"].encode())
    disk = root.findall("devices/disk")[1]
    disk.set("type", "file")
    source = disk.find("source")
    assert source is not None
    source.attrib.clear()
    source.set("file", f"{POOL}/vi9-blank2.raw")
    adopted = dataclasses.replace(dom, inactive_xml=etree.tostring(root, encoding="unicode"))
    live = dataclasses.replace(live, domains={**live.domains, "vi9-nofmt": adopted})
    memo = Memo()

    def vm_class(state: LiveState) -> ChangeClass:
        plan = make_plan(manifest, desired, state, opts, memo=memo)
        return next(c.change_class for c in plan.changes if c.name == "vi9-nofmt")

    assert vm_class(live) is ChangeClass.NOOP
    pool = live.pools["vi9-pool"]
    gone = dataclasses.replace(pool, volumes=tuple(v for v in pool.volumes
                                                   if v.name != "vi9-blank2.raw"))
    assert vm_class(dataclasses.replace(live, pools={"vi9-pool": gone})) is not ChangeClass.NOOP


def test_addresses_spelled_canonically_skip_normalising_and_mean_the_same() -> None:
    """facts._ip_text takes a dotted quad as written when it is already Python's spelling."""
    import ipaddress
    import itertools

    from kvmctl.host.facts import _ip_text

    def normalised(value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            return value

    octets = ["0", "1", "9", "10", "99", "100", "199", "200", "249", "250", "255", "256", "00",
              "01", "010"]
    values = [".".join(parts) for parts in itertools.product(octets, repeat=2)]
    values = [f"{v}.{v}" for v in values] + ["1.2.3", "1.2.3.4.5", "1.2.3.4\n", " 1.2.3.4",
                                             "::1", "fe80::1", "", "a.b.c.d"]
    assert [_ip_text(v) for v in values] == [normalised(v) for v in values]
