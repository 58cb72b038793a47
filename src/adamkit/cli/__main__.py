"""``python -m adamkit.cli``: the same as the ``adamkit`` command."""

from . import main

raise SystemExit(main())
