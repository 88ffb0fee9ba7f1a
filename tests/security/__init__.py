"""Each attack on the sidecar, reproduced as an attacker would send it, and kept as a
test once it is fixed."""
