"""Policy: which models a caller may use and which budgets a request counts against."""
