"""``python -m apps.tactile [hydra overrides]``: train (see ``apps.tactile.train``)."""

from apps.tactile.train import main

if __name__ == "__main__":
    main()
