"""The HTTP side (Starlette): admin API, health, device login, HTTP authorization."""
