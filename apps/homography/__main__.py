"""``python -m apps.homography [hydra overrides]``: train (see ``apps.homography.train``)."""

from apps.homography.train import main

if __name__ == "__main__":
    main()
