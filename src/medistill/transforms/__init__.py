"""Image transforms shared by tasks (pure numpy: arrays in, arrays out, no I/O)."""
