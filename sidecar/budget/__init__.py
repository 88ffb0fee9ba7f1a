"""Budget accounting assets: the Lua scripts the Redis store runs atomically."""
