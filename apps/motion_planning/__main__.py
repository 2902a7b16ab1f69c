"""``python -m apps.motion_planning [hydra overrides]``: train (see
``apps.motion_planning.train``)."""

from apps.motion_planning.train import main

if __name__ == "__main__":
    main()
