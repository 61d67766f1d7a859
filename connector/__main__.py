"""``python -m connector`` is the ``dynamo-local`` command."""

from connector.cli.main import main

raise SystemExit(main())
