"""The login-node side of a sweep: expand it, plan it, submit it. Torch-free."""
