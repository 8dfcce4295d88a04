"""`python -m shardline` runs the CLI."""

from shardline.cli import main

raise SystemExit(main())
