"""`python -m agent` is the same as the `egress-agent` command."""

from agent.cli import main

raise SystemExit(main())
