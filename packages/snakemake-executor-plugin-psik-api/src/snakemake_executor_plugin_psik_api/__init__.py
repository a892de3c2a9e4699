"""Snakemake executor plugin for psik-api (being written: issue 19)."""
