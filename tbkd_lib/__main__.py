"""``python -m tbkd_lib`` == the ``tbkd`` console script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
