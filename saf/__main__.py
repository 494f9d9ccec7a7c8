"""`python -m saf` runs the saf command."""

from saf.cli import main

main()
