"""Run ckptavg as ``python -m ckptavg``."""

from .cli import main

main()
