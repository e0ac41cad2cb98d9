"""Stage 3: the validated model -> libvirt XML and cloud-init seed images.

`definitions` renders every libvirt definition through the Jinja templates in templates/
(autoescaped, undefined names are errors; no XML is built any other way), `specs` holds the
values it produces (read by the planner without loading jinja2), `iso` builds a seed's NoCloud
ISO image.
"""
