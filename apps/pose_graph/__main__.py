"""``python -m apps.pose_graph [hydra overrides]``: train (see ``apps.pose_graph.train``)."""

from apps.pose_graph.train import main

if __name__ == "__main__":
    main()
