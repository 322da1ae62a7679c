"""`python -m shim` is the same as the `consul-locker` command."""

from shim.entry import main

raise SystemExit(main())
