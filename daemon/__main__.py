"""``python -m daemon`` is the ``backfilld`` command."""

from daemon.cli.main import main

raise SystemExit(main())
