"""Subcommands of ``megacpp-mcore`` (one module each)."""
