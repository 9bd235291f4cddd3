"""`python -m cpt_cli` (and `accelerate launch -m cpt_cli train RECIPE`)."""

from cpt_cli.cli import main

main()
