"""Stage 4: the hypervisor. `hypervisor` (with `reading` and `connection`) is the only code of
kvmctl that imports libvirt: it reads every object once into `state` values and performs single
operations. `facts` reads the comparable facts out of definitions, `ownership` the marks and
records of who owns what.

Importing this package does not import libvirt: the planner reads `state` and `facts` without it.
"""
