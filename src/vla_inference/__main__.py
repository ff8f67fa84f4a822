"""`python -m vla_inference` = the `vla-inference` command."""

from vla_inference.cli import main

raise SystemExit(main())
