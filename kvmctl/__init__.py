"""kvmctl: declarative VM provisioning for KVM/libvirt."""

__version__ = "0.1.0"
