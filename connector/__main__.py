"""``python -m connector`` is the ``dynamo-local`` command."""

from connector.cli import main

raise SystemExit(main())
