"""How many disks and interfaces a VM can have: the device layout the domain template uses, and
the limits of the machine it runs on. checks.device_limits refuses a VM beyond them, so that
render/definitions.py, which lays the devices out with the same functions, never runs out.

- Target names: disks are named in attachment order per prefix: `vd` for virtio, `sd` for
  sata and scsi together (plus the cloud-init seed, a scsi CD-ROM after them): a..z, then
  aa..zz, 702 names per prefix.
- q35 (PCI Express): the template gives every disk and interface its own pcie-root-port, plus
  one each for the six PCIe devices the VM may have beside them (virtio-scsi controller,
  memory balloon, RNG, virtio-serial for the guest agent, USB controller, one for a
  conventional-PCI bridge) and SPARE_HOTPLUG_PORTS for hot-plug. libvirt puts root ports on the
  root bus, eight to a slot (one per function), in the slots the chipset leaves free: 0x00 is
  the host bridge, 0x01 is kept for video, 0x1f holds the ICH9 LPC, SATA and SMBus functions;
  29 slots, 232 root ports (and 233 buses, within PCI's 256). So disks + interfaces <= 222.
- pc (i440FX, conventional PCI): libvirt adds pci-bridges (31 slots each) once the root bus is
  full, so the target names are the limit.
- SATA and SCSI: libvirt adds a controller for every six SATA (AHCI) or seven SCSI units; on
  q35 each one needs a slot, which the root port every disk gets already provides.
"""

from __future__ import annotations

import string
from collections.abc import Iterator

SPARE_HOTPLUG_PORTS = 4
PLATFORM_PCIE_DEVICES = 6
Q35_ROOT_PORTS = 29 * 8
Q35_DEVICES = Q35_ROOT_PORTS - PLATFORM_PCIE_DEVICES - SPARE_HOTPLUG_PORTS
TARGET_NAMES = 26 + 26 * 26


def target_names(prefix: str) -> Iterator[str]:
    """`vda`..`vdz`, `vdaa`..`vdzz` (TARGET_NAMES names) for prefix `vd`."""
    for letter in string.ascii_lowercase:
        yield prefix + letter
    for first in string.ascii_lowercase:
        for second in string.ascii_lowercase:
            yield prefix + first + second


def pcie_root_ports(disks: int, interfaces: int) -> int:
    """The pcie-root-ports the domain template declares on q35 for this many devices."""
    return disks + interfaces + PLATFORM_PCIE_DEVICES + SPARE_HOTPLUG_PORTS
