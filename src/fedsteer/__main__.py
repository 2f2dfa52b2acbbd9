"""`python -m fedsteer` is the `fedsteer` command."""

from fedsteer.cli import app

app(prog_name="fedsteer")
