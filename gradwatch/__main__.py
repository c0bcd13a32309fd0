"""``python -m gradwatch``: the ``gradwatch`` command (see :mod:`gradwatch.cli`)."""

from gradwatch.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
