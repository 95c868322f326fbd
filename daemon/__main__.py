"""``python -m daemon`` is the ``backfilld`` command."""

from daemon.cli import main

raise SystemExit(main())
