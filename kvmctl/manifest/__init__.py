"""Stages 1 and 2: YAML files -> located documents (`documents`) -> the validated, typed model
(`validate`: JSON schemas per kind, then `checks`; `model`; cloud-init content in `cloudinit`).

Nothing here talks to a hypervisor: `kvmctl validate` runs this stage alone.
"""
