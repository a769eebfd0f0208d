"""read stage of ckptavg (see the README's module map)."""
