"""The MoC core: layout, config, routing, `moc_attention`, kernels, attention processors and their installation.

It never imports the application (pipelines, training, command line, Hub, file formats) beside it.
"""

from . import kernels as _kernels  # noqa: F401  (registers the built-in attention backends)
