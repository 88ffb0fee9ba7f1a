"""The demo: the whole product on this machine (`scripts/demo.sh`)."""
