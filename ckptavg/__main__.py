"""Run ckptavg as ``python -m ckptavg``."""

from .cli.app import main

main()
