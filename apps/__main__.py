"""``python -m apps``: the apps, one line each, and how to run them."""

from __future__ import annotations

import apps


def main() -> None:
    width = max(len(name) for name in apps.APPS)
    print("Ariadne's training apps (python -m apps.<app> [preset=smoke] [key=value ...]; "
          "--cfg job prints an app's whole config):")
    for name in apps.APPS:
        task = apps.task(name)
        print(f"  {name:<{width}}  python -m apps.{name}  # {task.title}; held-out "
              f"{task.metric} vs a tuned baseline")


if __name__ == "__main__":
    main()
