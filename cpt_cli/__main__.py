"""`python -m cpt_cli` (and `accelerate launch -m cpt_cli train RECIPE`)."""

import os

if "TORCHELASTIC_RUN_ID" in os.environ:
    # A worker of `accelerate launch`: in a session of its own, it would train on unsupervised
    # if the launcher were killed; this signal then checkpoints and stops it instead.
    from cpt_cli.runs.lock import LAUNCHER_GONE, stop_with_parent

    stop_with_parent(LAUNCHER_GONE)

from cpt_cli.cli import main  # noqa: E402

main()
