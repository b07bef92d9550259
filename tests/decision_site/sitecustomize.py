"""Started with every Python process that has this folder on its path: records the scheduling
decisions of a role process when ``JDS_DECISIONS_DIR`` names where (see decision_recorder.py)."""

import os

if os.environ.get("JDS_DECISIONS_DIR"):
    import decision_recorder

    decision_recorder.install_to_file(os.environ["JDS_DECISIONS_DIR"])
