"""``python -m apps.bundle_adjustment [hydra overrides]``: train (see
``apps.bundle_adjustment.train``)."""

from apps.bundle_adjustment.train import main

if __name__ == "__main__":
    main()
