"""Subcommands of the `diffusers-moc` CLI (see `diffusers_moc.cli`)."""
