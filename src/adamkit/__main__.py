"""``python -m adamkit``: the same as the ``adamkit`` command."""

from .cli import main

raise SystemExit(main())
