"""``python -m abbycli`` runs the command line."""

from .cli import main

main()
