"""``python -m apps.tactile.study [--quick] [--out DIR] [...]``: the backward-mode study on the
tactile app (unroll, truncated, implicit and dlm at 2, 5, 10 and 20 inner iterations: held-out
error, time per training step, memory kept for the backward), as ``apps.study`` runs it:
``DIR/backward_study.md``, ``.csv`` and ``.png`` (default ``DIR``: ``study_tactile``)."""

from __future__ import annotations

import sys

from apps import study

if __name__ == "__main__":
    study.main(["tactile", *sys.argv[1:]])
