"""`python -m dowser` is the `dowser` command."""

from dowser.cli import main

raise SystemExit(main())
