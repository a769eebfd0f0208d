"""The `ckptavg` command line."""
