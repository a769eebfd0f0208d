"""The `ckptavg` command line.

app.py (the Typer app, error style, `main`) · options.py (every option once, as an `Annotated` alias; the
parameter -> flag table) · average.py (the method commands) · plan.py (their `plan` twins) · bn.py ·
inspect.py · values.py (options -> library values; the calls commands end in) · progress.py · text.py.
Nothing is imported from the library until a command runs, so `ckptavg --help` imports no torch.
"""
