"""`python -m devtools.demo [--check | --approve CODE [--admin]]`, as `scripts/demo.sh` runs it."""

from devtools.demo.run import main

raise SystemExit(main())
