"""`strata features ...`: feature tables of SAE latents (being built)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Add this module's subcommands to the `strata` parser."""
