"""``python -m abbycli`` runs the command line."""

from .cli.app import main

main()
