"""Which job works on which run, and whether it lives: what the login node and the job both use. Torch-free."""
