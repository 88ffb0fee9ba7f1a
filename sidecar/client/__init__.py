"""The command line's client side: signing in (device login), calling the sidecar's API as
a caller or an admin, and rendering its answers (budgets, usage)."""
