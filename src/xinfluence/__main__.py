"""``python -m xinfluence``: the ``xinfluence`` command."""

from xinfluence.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
