"""Each attack on the budget, reproduced as an attacker would send it."""
