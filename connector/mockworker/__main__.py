"""``python -m connector.mockworker``."""

from connector.mockworker.app import main

raise SystemExit(main())
