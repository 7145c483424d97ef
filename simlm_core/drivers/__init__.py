"""Command-line entry points (``python -m simlm_core.drivers.<name> --args-json '{...}'``),
each a thin wrapper over one library function; they also run under ``torchrun``."""
