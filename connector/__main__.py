"""``python -m connector`` is the ``dynamo-local`` command."""

from connector.cli.program import main

raise SystemExit(main())
