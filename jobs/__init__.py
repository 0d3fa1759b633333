"""Strata jobs: the `strata` command line, job specs and Ray job entry points."""
