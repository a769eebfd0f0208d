"""The `ckptavg` command line.

app.py (the Typer app, error style, `main`) · options.py (every common option once, as an `Annotated` alias;
the parameter -> flag table) · method_options.py (the method options) · lists.py (comma lists: sweeps) ·
builders.py (method options -> plans) · average.py and posthoc.py (the method commands) · plan.py (their
`plan` twins) · plot.py (`plan --plot`) · bn.py · inspect.py · values.py (options -> library values; the calls
commands end in) · progress.py · text.py.
Nothing is imported from the library until a command runs, so `ckptavg --help` imports no torch.
"""
